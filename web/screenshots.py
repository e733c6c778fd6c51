"""Screenshots of the chat page for the README: docs/chat-light.png and docs/chat-dark.png.

Start a server first (`qwen15 serve --port 8000`), then: python web/screenshots.py --url http://127.0.0.1:8000
Needs selenium and Debian's chromium + chromium-driver (the same as tests/test_chat_page.py).
"""

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

PROMPTS = ["What is the quadratic formula? One line of math, no code.",
           "Write is_prime(n) in Python, briefly. Then give its time complexity as LaTeX math."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--key", default="", help="the server's --api-key, if any")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    args = ap.parse_args()
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1100,1250",
              f"--user-data-dir={tempfile.mkdtemp()}"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        d.get(args.url + "/")
        d.execute_script("localStorage.clear(); localStorage.setItem('qwen15.apiKey', arguments[0]);"
                         "localStorage.setItem('qwen15.settings', JSON.stringify({temperature: 0, max_tokens: 240}))",
                         args.key)
        for prompt in PROMPTS:
            d.refresh()
            time.sleep(1)
            d.find_element(By.ID, "new-chat").click()
            d.find_element(By.ID, "input").send_keys(prompt, Keys.ENTER)
            time.sleep(1)
            while d.execute_script("return document.body.classList.contains('streaming')"):
                time.sleep(0.5)
        time.sleep(2.5)  # the status view refreshes
        d.execute_script("document.getElementById('messages').scrollTop = 0; document.activeElement.blur()")
        out = Path(args.out)
        out.mkdir(exist_ok=True)
        # light: the math answer (the older conversation); dark: the code answer
        for scheme, which in (("light", -1), ("dark", 0)):
            d.find_elements(By.CSS_SELECTOR, "#conversations .conv-title")[which].click()
            d.execute_script("document.getElementById('messages').scrollTop = 0; document.activeElement.blur()")
            d.execute_cdp_cmd("Emulation.setEmulatedMedia",
                              {"features": [{"name": "prefers-color-scheme", "value": scheme}]})
            time.sleep(0.3)
            image = Image.open(io.BytesIO(d.get_screenshot_as_png())).convert("RGB")
            # a 256-colour palette keeps the PNG small; text and flat colours survive it
            image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(out / f"chat-{scheme}.png", optimize=True)
            print(out / f"chat-{scheme}.png", (out / f"chat-{scheme}.png").stat().st_size)
        print(json.dumps(d.execute_script("return localStorage.getItem('qwen15.conversations')"))[:300])
    finally:
        d.quit()


if __name__ == "__main__":
    main()
