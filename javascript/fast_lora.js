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
    const app = document.querySelector("gradio-app") || document.body;
    fastLoraCropEditor(app.shadowRoot || app);
    // Outputs: the language radio, and (when present) the "show Chinese translations" box.
    return [label, code === "zh_CN"];
}

// ---- Crop editor (Prepare tab): drag the crop box, or its corners and edges, on the source.
// The server draws the box into the image (the orange frame); this overlay makes it draggable
// and writes the result into the Left/Top/Right/Bottom fields, whose change redraws the image.

// The new box [x0, y0, x1, y1] (source pixels) after a drag of (dx, dy) source pixels.
// mode: "move", or the edges it holds: "n", "s", "e", "w", "ne", "nw", "se", "sw".
// The box stays inside the w x h image and at least minSide wide and high.
function fastLoraCropDrag(box, mode, dx, dy, w, h, minSide) {
    let [x0, y0, x1, y1] = box;
    const min = Math.max(1, minSide || 1);
    if (mode === "move") {
        const bw = x1 - x0, bh = y1 - y0;
        const nx = Math.min(Math.max(0, x0 + dx), Math.max(0, w - bw));
        const ny = Math.min(Math.max(0, y0 + dy), Math.max(0, h - bh));
        return [nx, ny, nx + bw, ny + bh].map(Math.round);
    }
    if (mode.includes("w")) x0 = Math.min(Math.max(0, x0 + dx), x1 - min);
    if (mode.includes("e")) x1 = Math.max(Math.min(w, x1 + dx), x0 + min);
    if (mode.includes("n")) y0 = Math.min(Math.max(0, y0 + dy), y1 - min);
    if (mode.includes("s")) y1 = Math.max(Math.min(h, y1 + dy), y0 + min);
    return [x0, y0, x1, y1].map(Math.round);
}

// Where an image of natW x natH shows inside an element of elW x elH with object-fit: contain.
function fastLoraContainRect(elW, elH, natW, natH) {
    const scale = Math.min(elW / natW, elH / natH);
    return {left: (elW - natW * scale) / 2, top: (elH - natH * scale) / 2, scale: scale};
}

function fastLoraCropEditor(root) {
    const HANDLES = ["nw", "n", "ne", "e", "se", "s", "sw", "w"];
    const q = (sel) => root.querySelector(sel);
    const fields = () => ["x0", "y0", "x1", "y1"].map((k) => q(`#fast_lora_prepare_${k} input`));
    function sourceSize() {
        const info = q("#fast_lora_prepare_crop_info [data-w]");
        return info ? [Number(info.dataset.w), Number(info.dataset.h)] : null;
    }
    function readBox() {
        const f = fields();
        return f.every((i) => i) ? f.map((i) => Number(i.value) || 0) : null;
    }
    function writeBox(box) {
        fields().forEach((input, i) => {
            if (Number(input.value) === box[i]) return;  // each changed field redraws the image once
            input.value = String(box[i]);
            input.dispatchEvent(new Event("input", {bubbles: true}));
            input.dispatchEvent(new Event("change", {bubbles: true}));
        });
    }
    function layout(img) {
        // Source pixels -> pixels of the img's parent, where the overlay lives.
        const size = sourceSize();
        if (!size || !img.naturalWidth || !img.clientWidth) return null;
        const r = fastLoraContainRect(img.clientWidth, img.clientHeight, img.naturalWidth, img.naturalHeight);
        const perSource = r.scale * img.naturalWidth / size[0];
        return {x: img.offsetLeft + r.left, y: img.offsetTop + r.top, k: perSource, w: size[0], h: size[1]};
    }
    function overlayFor(img) {
        const parent = img.parentElement;
        let box = parent.querySelector(":scope > .fast-lora-crop-box");
        if (box) return box;
        if (getComputedStyle(parent).position === "static") parent.style.position = "relative";
        box = document.createElement("div");
        box.className = "fast-lora-crop-box";
        box.dataset.mode = "move";
        for (const m of HANDLES) {
            const h = document.createElement("div");
            h.className = `fast-lora-crop-handle fast-lora-crop-${m}`;
            h.dataset.mode = m;
            box.appendChild(h);
        }
        parent.appendChild(box);
        box.addEventListener("pointerdown", (ev) => startDrag(img, box, ev));
        box.addEventListener("click", (ev) => ev.stopPropagation());  // not a "move the box here" click
        return box;
    }
    function place(img, box, src) {
        const l = layout(img);
        if (!l || !src || src[2] <= src[0] || src[3] <= src[1]) { box.style.display = "none"; return; }
        box.style.display = "block";
        box.style.left = `${l.x + src[0] * l.k}px`;
        box.style.top = `${l.y + src[1] * l.k}px`;
        box.style.width = `${(src[2] - src[0]) * l.k}px`;
        box.style.height = `${(src[3] - src[1]) * l.k}px`;
    }
    function startDrag(img, box, ev) {
        const l = layout(img), start = readBox();
        if (!l || !start) return;
        ev.preventDefault();
        ev.stopPropagation();
        const mode = ev.target.dataset.mode || "move";
        const x = ev.clientX, y = ev.clientY;
        let now = start;
        box.setPointerCapture(ev.pointerId);
        const move = (e) => {
            now = fastLoraCropDrag(start, mode, (e.clientX - x) / l.k, (e.clientY - y) / l.k, l.w, l.h, 8);
            place(img, box, now);
        };
        const up = () => {
            box.removeEventListener("pointermove", move);
            box.removeEventListener("pointerup", up);
            box.removeEventListener("pointercancel", up);
            if (now.some((v, i) => v !== start[i])) writeBox(now);
        };
        box.addEventListener("pointermove", move);
        box.addEventListener("pointerup", up);
        box.addEventListener("pointercancel", up);
    }
    function refresh() {
        const img = q("#fast_lora_prepare_source img");
        if (!img) return;
        const box = overlayFor(img);
        if (!img.dataset.fastLoraCrop) {
            img.dataset.fastLoraCrop = "1";
            img.addEventListener("load", () => place(img, box, readBox()));
        }
        place(img, box, readBox());
    }
    // Typed coordinates move the overlay at once; a new image (another photo, a redraw) places it again.
    root.addEventListener("input", (ev) => {
        if (ev.target.closest && ev.target.closest("[id^=fast_lora_prepare_x], [id^=fast_lora_prepare_y]")) refresh();
    }, true);
    let queued = false;
    new MutationObserver(() => {  // at most once a frame: the host's page changes often
        if (queued) return;
        queued = true;
        requestAnimationFrame(() => { queued = false; refresh(); });
    }).observe(root, {childList: true, subtree: true});
    window.addEventListener("resize", refresh);
    refresh();
}

if (typeof onUiLoaded === "function") {  // inside A1111: its page helpers call us once the UI is built
    onUiLoaded(() => fastLoraCropEditor(typeof gradioApp === "function" ? gradioApp() : document));
}
