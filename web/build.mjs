// Bundles src/ into ../src/qwen15/serve/web/ (shipped in the Python package): `npm ci && npm run build`.
import { createHash } from "node:crypto";
import { readFile, readdir, rm, mkdir, writeFile } from "node:fs/promises";
import path from "node:path";
import * as esbuild from "esbuild";

const out = path.resolve("../src/qwen15/serve/web");

// KaTeX's stylesheet lists each font as woff2, woff and ttf; every browser that runs this page reads woff2,
// so the other two are dropped before bundling (they would triple the fonts shipped).
const woff2Only = {
  name: "katex-woff2-only",
  setup(build) {
    build.onLoad({ filter: /katex[\\/]dist[\\/]katex(\.min)?\.css$/ }, async (args) => {
      const css = await readFile(args.path, "utf8");
      const contents = css.replace(/,\s*url\([^)]*\.(woff|ttf)\)\s*format\("(woff|truetype)"\)/g, "");
      if (/\.(woff|ttf)\)/.test(contents)) throw new Error("katex.css: a woff/ttf font reference survived");
      return { contents, loader: "css", resolveDir: path.dirname(args.path) };
    });
  },
};

// markdown-it-texmath require()s katex while main.js imports it: without this the bundle would carry both
// of KaTeX's builds (CommonJS and ESM), 270 KB more.
const oneKatex = {
  name: "one-katex",
  setup(build) {
    build.onResolve({ filter: /^katex$/ }, () => ({ path: path.resolve("node_modules/katex/dist/katex.mjs") }));
  },
};

await rm(out, { recursive: true, force: true });
await mkdir(path.join(out, "ui"), { recursive: true });
const result = await esbuild.build({
  entryPoints: { app: "src/main.js" },
  bundle: true,
  minify: true,
  format: "iife",
  target: ["es2020"],
  outdir: path.join(out, "ui"),
  // Content-hashed names: index.html is revalidated on every load, and after an upgrade it cannot be
  // paired with a script or stylesheet the browser cached from the previous version.
  entryNames: "[name]-[hash]",
  loader: { ".woff2": "file" },
  assetNames: "fonts/[name]",
  legalComments: "linked",
  metafile: true,
  plugins: [woff2Only, oneKatex],
  logLevel: "info",
});
const built = Object.keys(result.metafile.outputs).map((f) => path.relative(out, f).split(path.sep).join("/"));
const pick = (re) => {
  const found = built.filter((f) => re.test(f));
  if (found.length !== 1) throw new Error(`expected one output matching ${re}, got ${found}`);
  return found[0];
};
const html = (await readFile("src/index.html", "utf8"))
  .replace('href="ui/app.css"', `href="${pick(/^ui\/app-[^/]+\.css$/)}"`)
  .replace('src="ui/app.js"', `src="${pick(/^ui\/app-[^/]+\.js$/)}"`);
if (html.includes('"ui/app.')) throw new Error("index.html: an unhashed asset reference survived");
await writeFile(path.join(out, "index.html"), html);

// A fingerprint of what the bundle was built from; tests/test_chat_page.py recomputes it from web/ and
// fails when the sources changed without a rebuild.
const sources = ["build.mjs", "package.json", "package-lock.json",
  ...(await readdir("src")).map((f) => `src/${f}`)].sort();
const hash = createHash("sha256");
for (const f of sources) hash.update(`${f}\0`).update(await readFile(f)).update("\0");
await writeFile(path.join(out, "ui", "SOURCES.sha256"), `${hash.digest("hex")}\n`);
