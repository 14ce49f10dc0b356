// Fast LoRA page helpers. A1111 injects every javascript/*.js into its page; there its own
// localization.js translates our labels from localizations/<lang>.json. The standalone app
// has no such machinery, so fastLoraStandaloneInit does the same job for its page.

function fastLoraTranslator(map) {
    const attrs = ["placeholder", "title", "aria-label"];
    function translateText(node) {
        const text = node.textContent.trim();
        if (text && Object.prototype.hasOwnProperty.call(map, text) && map[text] !== text) {
            node.textContent = node.textContent.replace(text, map[text]);
        }
    }
    function walk(root) {
        if (!root) return;
        if (root.nodeType === Node.TEXT_NODE) { translateText(root); return; }
        if (root.nodeType !== Node.ELEMENT_NODE) return;
        if (root.tagName === "SCRIPT" || root.tagName === "STYLE" || root.tagName === "TEXTAREA") return;
        for (const a of attrs) {
            const v = root.getAttribute && root.getAttribute(a);
            if (v && Object.prototype.hasOwnProperty.call(map, v.trim()) && map[v.trim()] !== v.trim()) {
                root.setAttribute(a, map[v.trim()]);
            }
        }
        // An <input type=button>/<option> carries its text in value/text.
        for (const child of root.childNodes) walk(child);
    }
    return walk;
}

function fastLoraStandaloneInit(maps, languages) {
    const saved = localStorage.getItem("fast_lora_lang") || "English";
    const label = Object.prototype.hasOwnProperty.call(languages, saved) ? saved : "English";
    const code = languages[label];
    const map = maps[code];
    if (map && Object.keys(map).length) {
        const walk = fastLoraTranslator(map);
        const app = document.querySelector("gradio-app") || document.body;
        const root = app.shadowRoot || app;
        walk(root);
        new MutationObserver((records) => {
            for (const r of records) {
                for (const n of r.addedNodes) walk(n);
                if (r.type === "characterData") walk(r.target);
            }
        }).observe(root, {childList: true, subtree: true, characterData: true});
        document.documentElement.lang = code.replace("_", "-");
    }
    // The language switch reloads the page; it noted the open tab, which is opened again here.
    const tab = parseInt(sessionStorage.getItem("fast_lora_tab") || "-1", 10);
    sessionStorage.removeItem("fast_lora_tab");
    if (tab > 0) {
        const app = document.querySelector("gradio-app");
        const root = (app && app.shadowRoot) || document;
        let tries = 0;
        const reopen = () => {
            const buttons = root.querySelectorAll("#fast_lora_tabs .tab-nav button");
            if (buttons.length > tab) buttons[tab].click();
            else if (tries++ < 40) setTimeout(reopen, 100);
        };
        reopen();
    }
    // Outputs: the language radio, and (when present) the "show Chinese translations" box.
    return [label, code === "zh_CN"];
}
