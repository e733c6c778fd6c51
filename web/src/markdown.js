// Model output -> safe HTML: markdown-it (GFM tables, fences), KaTeX through markdown-it-texmath for
// $...$, $$...$$, \(...\) and \[...\] (the delimiters Qwen writes), highlight.js for code, and DOMPurify
// over the result, because replies and imported conversations are untrusted.
import MarkdownIt from "markdown-it";
import texmath from "markdown-it-texmath";
import katex from "katex";
import DOMPurify from "dompurify";
import hljs from "highlight.js/lib/core";
import bash from "highlight.js/lib/languages/bash";
import c from "highlight.js/lib/languages/c";
import cpp from "highlight.js/lib/languages/cpp";
import csharp from "highlight.js/lib/languages/csharp";
import css from "highlight.js/lib/languages/css";
import diff from "highlight.js/lib/languages/diff";
import go from "highlight.js/lib/languages/go";
import java from "highlight.js/lib/languages/java";
import javascript from "highlight.js/lib/languages/javascript";
import json from "highlight.js/lib/languages/json";
import kotlin from "highlight.js/lib/languages/kotlin";
import markdown from "highlight.js/lib/languages/markdown";
import php from "highlight.js/lib/languages/php";
import python from "highlight.js/lib/languages/python";
import ruby from "highlight.js/lib/languages/ruby";
import rust from "highlight.js/lib/languages/rust";
import shell from "highlight.js/lib/languages/shell";
import sql from "highlight.js/lib/languages/sql";
import swift from "highlight.js/lib/languages/swift";
import typescript from "highlight.js/lib/languages/typescript";
import xml from "highlight.js/lib/languages/xml";
import yaml from "highlight.js/lib/languages/yaml";

// The languages a coder model writes most; the full highlight.js build would add ~800 KB.
const LANGUAGES = { bash, c, cpp, csharp, css, diff, go, java, javascript, json, kotlin, markdown, php, python,
  ruby, rust, shell, sql, swift, typescript, xml, yaml };
for (const [name, lang] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, lang);

const md = new MarkdownIt({
  html: true, // replies may use <br>, <sub>, <details>: DOMPurify below decides what survives
  linkify: true,
  breaks: false,
  highlight(code, lang) {
    const name = (lang || "").trim().split(/\s+/)[0].toLowerCase();
    let body;
    try {
      body = name && hljs.getLanguage(name)
        ? hljs.highlight(code, { language: name, ignoreIllegals: true }).value
        : hljs.highlightAuto(code).value;
    } catch {
      body = md.utils.escapeHtml(code);
    }
    const label = md.utils.escapeHtml(name || "text");
    return `<pre class="code"><div class="code-head"><span class="lang">${label}</span></div>` +
      `<code class="hljs language-${label}">${body}</code></pre>`;
  },
});
md.use(texmath, { engine: katex, delimiters: ["dollars", "brackets"], katexOptions: { throwOnError: false, output: "htmlAndMathml" } });

// Links leave the page in a new tab and cannot reach back into it.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

const PURIFY = {
  ADD_ATTR: ["target"],
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe", "object", "embed"],
  FORBID_ATTR: ["autofocus"],
};

export function renderMarkdown(text) {
  return DOMPurify.sanitize(md.render(text || ""), PURIFY);
}

/** Copy buttons on code blocks: made as DOM nodes after sanitising, never as HTML from the reply. */
export function addCopyButtons(root) {
  for (const head of root.querySelectorAll("pre.code > .code-head")) {
    if (head.querySelector("button.copy")) continue;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy";
    button.textContent = "Copy";
    head.appendChild(button);
  }
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // http:// on another host is not a secure context: no async clipboard there
    const area = document.createElement("textarea");
    area.value = text;
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}
