// fieldreid review: the page. Plain JavaScript, no libraries, nothing loaded from elsewhere (works offline).
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const CSRF = document.querySelector('meta[name="csrf-token"]').content;
  const DEFAULT_WHO = document.querySelector('meta[name="reviewer"]').content;
  const S = { items: [], index: -1, item: null, frame: 0, mine: [], busy: false, zoom: { z: 1, fit: 1, x: 0, y: 0 } };

  // ------------------------------------------------------------------ helpers
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const kid of kids.flat()) if (kid !== null && kid !== undefined) e.append(kid);
    return e;
  }
  const fill = (node, ...kids) => node.replaceChildren(...kids.flat().filter((k) => k !== null && k !== undefined && k !== false));
  const fmt = (v, d = 3) => (v === null || v === undefined ? "—" : Number(v).toFixed(d));
  const who = () => ($("who").value || "").trim() || DEFAULT_WHO;

  async function api(path) {
    const r = await fetch(path, { credentials: "same-origin" });
    const data = await r.json().catch(() => ({ error: r.statusText }));
    if (!r.ok) throw new Error(data.error || r.statusText);
    return data;
  }
  async function post(path, body) {
    const r = await fetch(path, { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": CSRF }, body: JSON.stringify(body) });
    const data = await r.json().catch(() => ({ error: r.statusText }));
    if (!r.ok) throw new Error(data.error || r.statusText);
    return data;
  }
  let toastTimer = null;
  function toast(msg, ok = true) {
    const t = $("toast");
    t.textContent = msg;
    t.className = "toast " + (ok ? "ok" : "err");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.textContent = ""; }, ok ? 6000 : 12000);
  }

  // ------------------------------------------------------------------ queue
  function filterParams() {
    const p = new URLSearchParams();
    for (const [k, id] of [["status", "f-status"], ["decision", "f-decision"], ["camera", "f-camera"],
      ["species", "f-species"], ["from", "f-from"], ["to", "f-to"], ["min", "f-min"], ["max", "f-max"]]) {
      const v = $(id).value;
      if (v) p.set(k, v);
    }
    return p;
  }
  function showCounts(c) {
    $("progress").textContent = `${c.to_review} to review · ${c.reviewed} reviewed · ${c.tracks} animals ` +
      `(${c.by_decision.new} new, ${c.by_decision.uncertain} uncertain, ${c.by_decision.known} known)`;
  }
  async function loadQueue(keepKey) {
    const data = await api("api/queue?" + filterParams());
    S.items = data.items;
    showCounts(data.counts);
    const list = $("queue-list");
    fill(list, ...S.items.map((it, i) => {
      const label = it.review ? it.review.verdict.replace("_", " ") : it.decision;
      return el("li", { "data-key": it.key, class: it.review ? "done" : "", onclick: () => select(i) },
        el("img", { src: it.thumb, alt: "", loading: "lazy" }),
        el("div", {},
          el("div", { class: "q1" }, el("span", { class: "badge " + (it.review ? "done" : it.decision), text: label }),
            it.qc && !it.review ? el("span", { class: "badge qc", text: "QC" }) : null, " ",
            it.identity || "—"),
          el("div", { class: "q2", text: `${it.camera} · ${it.captured.slice(0, 16).replace("T", " ")}` }),
          el("div", { class: "q2", text: `score ${fmt(it.score)} · ${it.n_frames} frame${it.n_frames > 1 ? "s" : ""}` })));
    }));
    let idx = keepKey ? S.items.findIndex((it) => it.key === keepKey) : -1;
    if (idx < 0) idx = Math.min(Math.max(S.index, 0), S.items.length - 1);
    if (S.items.length === 0) {
      S.index = -1; S.item = null;
      $("item").hidden = true;
      $("empty").hidden = false;
      $("empty").textContent = $("f-status").value === "todo"
        ? "Nothing left to review with these filters. Well done." : "No animals match these filters.";
      return;
    }
    await select(idx);
  }
  async function select(i) {
    if (i < 0 || i >= S.items.length) return;
    S.index = i;
    for (const li of $("queue-list").children) li.classList.toggle("current", li.dataset.key === S.items[i].key);
    const cur = $("queue-list").children[i];
    if (cur) cur.scrollIntoView({ block: "nearest" });
    const item = await api("api/item/" + encodeURIComponent(S.items[i].key));
    S.item = item;
    S.frame = 0;
    render();
  }

  // ------------------------------------------------------------------ one track
  function render() {
    const it = S.item;
    $("empty").hidden = true;
    $("item").hidden = false;
    closeForms();
    if (S.shown !== it.key) $("main").scrollTop = 0;  // a new track starts at its pictures
    S.shown = it.key;
    const sum = $("summary");
    sum.className = "summary " + it.decision;
    const ident = it.identity;
    let said;
    // score: what the thresholds compared (cosine, or the fused probability where verification decided);
    // probability: the calibrated probability that the decision is right (none without a calibration)
    const prob = it.probability === null || it.probability === undefined ? "" : `, probability ${fmt(it.probability)}`;
    if (it.decision === "new") said = `new animal${ident ? " → " + ident.id + (ident.own ? " (provisional, made for it)" : "") : ""}${prob ? ` (${prob.slice(2)})` : ""}`;
    else if (it.decision === "uncertain") said = `uncertain: best candidate ${it.machine_identity} (score ${fmt(it.score)}${prob})`;
    else said = `known as ${it.machine_identity} (score ${fmt(it.score)}${prob})`;
    const th = it.calibrated ? `thresholds ${fmt(it.lower)} / ${fmt(it.upper)}` : `thresholds ${fmt(it.lower)} / ${fmt(it.upper)} (uncalibrated)`;
    fill(sum, 
      el("span", { class: "badge " + it.decision, text: it.decision }), it.qc ? el("span", { class: "badge qc", text: "QC sample" }) : null,
      el("span", { class: "big", text: "Machine: " + said }),
      ident && !ident.own && ident.id !== it.machine_identity ? el("span", { text: `now in the gallery as ${ident.id}` }) : null,
      el("span", { class: "meta", text: `${it.species} · camera ${it.camera} · ${it.captured.replace("T", " ")} · event ${it.event}` +
        ` track ${it.track} · ${it.n_frames} frame${it.n_frames > 1 ? "s" : ""} · ${th}` }));
    const rev = $("reviewed");
    if (it.review) {
      rev.hidden = false;
      const what = it.review.verdict === "same" ? `same as ${ident ? ident.id : "?"}` :
        it.review.verdict === "new" ? `new individual ${ident ? ident.id + (ident.name ? " “" + ident.name + "”" : "") : ""}` :
        it.review.verdict.replace("_", " ") + (it.review.note ? ` (${it.review.note})` : "");
      fill(rev, el("b", { text: "Reviewed: " + what }),
        ` — by ${it.review.who} at ${it.review.at.replace("T", " ")} (decision #${it.review.review}) `,
        el("button", { type: "button", id: "undo-this", onclick: () => undo(it.review.review), text: "Undo this decision" }));
    } else if (!it.in_gallery) {
      rev.hidden = false;
      fill(rev, el("b", { text: "This animal is not in the gallery opened here; start fieldreid review with the gallery watch used (--gallery)." }));
    } else rev.hidden = true;
    const locked = !!it.review || !it.in_gallery;
    for (const id of ["act-new", "act-species", "act-notanimal"]) $(id).disabled = locked;
    renderFrames();
    renderCandidates(locked);
  }

  function renderFrames() {
    const it = S.item;
    const f = it.frames[S.frame];
    $("frame").src = f.frame;
    const b = $("box");
    b.style.left = (f.box[0] * 100) + "%"; b.style.top = (f.box[1] * 100) + "%";
    b.style.width = (f.box[2] * 100) + "%"; b.style.height = (f.box[3] * 100) + "%";
    $("frame-cap").textContent = `${f.file} · ${f.width}×${f.height} px · ${f.captured.replace("T", " ")} · detector ${fmt(f.conf, 2)}` +
      (it.frames.length > 1 ? ` · frame ${S.frame + 1} of ${it.frames.length}` : "");
    const crop = $("crop");
    crop.onload = () => { zoomReset(); $("crop-cap").textContent = `crop ${crop.naturalWidth}×${crop.naturalHeight} px, full resolution`; };
    crop.src = f.crop;
    fill($("strip"), ...(it.frames.length > 1 ? it.frames.map((fr, i) =>
      el("img", { src: fr.thumb, alt: `frame ${i + 1}`, class: i === S.frame ? "on" : "", title: fr.file,
        onclick: () => { S.frame = i; renderFrames(); } })) : []));
  }

  function renderCandidates(locked) {
    const it = S.item;
    const list = $("candidates");
    if (!it.candidates.length) {
      fill(list, el("li", {}, el("div", { text: "No candidates of this species in the gallery." })));
      return;
    }
    const canMerge = it.identity && !it.identity.own;
    fill(list, ...it.candidates.map((c, i) => {
      const n = i + 1;
      const photos = c.photos.map((p) => {
        const fig = el("button", { type: "button", class: "photo", title: "compare side by side",
          onclick: () => compare(p, `${c.id} · ${p.kind === "embedding" ? "gallery photo" : "field sighting"} · cosine ${fmt(p.score)}`) },
          el("img", { src: p.src, alt: `${c.id} photo`, loading: "lazy" }),
          el("span", { text: `${p.kind === "embedding" ? "" : "field · "}cos ${fmt(p.score)}` }));
        fig.querySelector("img").addEventListener("error", () => fig.classList.add("broken"));
        return fig;
      });
      const more = c.n_embeddings > c.photos.filter((p) => p.kind === "embedding").length
        ? el("span", { class: "cinfo", text: `+${c.n_embeddings - c.photos.filter((p) => p.kind === "embedding").length} more` }) : null;
      return el("li", { class: c.current ? "current" : "", "data-id": c.id },
        el("div", { class: "cand-head" },
          el("div", {}, el("span", { class: "rank", text: String(n) }), el("span", { class: "cid", text: c.id }),
            c.name && c.name !== c.id ? el("span", { class: "cname", text: " “" + c.name + "”" }) : null),
          el("div", { class: "cinfo", text: `${c.species} · ${c.status}${c.current ? " · its identity now" : ""} · ${c.n_embeddings} photo${c.n_embeddings === 1 ? "" : "s"}, ${c.n_sightings} sighting${c.n_sightings === 1 ? "" : "s"}` }),
          el("div", { class: "score" }, el("span", { text: fmt(c.score) }),
            el("span", { class: "bar" }, (() => { const b = el("i"); b.style.width = Math.max(0, Math.min(1, c.score)) * 100 + "%"; return b; })())),
          el("div", { class: "cand-buttons" },
            el("button", { type: "button", class: "primary", disabled: locked, onclick: () => same(i, false),
              "data-action": "same", text: `Same as ${n}` }, " ", el("kbd", { text: String(n) })),
            canMerge && c.id !== it.identity.id ? el("button", { type: "button", disabled: locked, onclick: () => same(i, true),
              "data-action": "merge", title: `merge all of ${it.identity.id} into ${c.id}`, text: "Merge identity" }, " ", el("kbd", { text: "⇧" + n })) : null)),
        el("div", { class: "photos" }, photos, more));
    }));
  }

  // ------------------------------------------------------------------ zoom and compare
  function applyZoom() {
    const z = S.zoom, img = $("crop");
    img.style.transform = `translate(${z.x}px, ${z.y}px) scale(${z.fit * z.z})`;
    $("zoom-level").textContent = z.z === 1 ? "fit" : Math.round(z.fit * z.z * 100) + "%";
  }
  function zoomReset() {
    const img = $("crop"), box = $("crop-wrap");
    const w = img.naturalWidth || 1, h = img.naturalHeight || 1;
    const fit = Math.min(box.clientWidth / w, box.clientHeight / h);
    S.zoom = { z: 1, fit, x: (box.clientWidth - w * fit) / 2, y: (box.clientHeight - h * fit) / 2 };
    applyZoom();
  }
  function zoomBy(f, cx, cy) {
    const z = S.zoom, box = $("crop-wrap");
    const nz = Math.max(1, Math.min(z.z * f, 16 / Math.max(z.fit, 0.01)));
    if (cx === undefined) { cx = box.clientWidth / 2; cy = box.clientHeight / 2; }
    const k = nz / z.z;
    z.x = cx - (cx - z.x) * k; z.y = cy - (cy - z.y) * k; z.z = nz;
    if (nz === 1) return zoomReset();
    applyZoom();
  }
  function setupZoom() {
    const box = $("crop-wrap");
    box.addEventListener("wheel", (e) => {
      e.preventDefault();
      const r = box.getBoundingClientRect();
      zoomBy(e.deltaY < 0 ? 1.25 : 0.8, e.clientX - r.left, e.clientY - r.top);
    }, { passive: false });
    let drag = null;
    box.addEventListener("mousedown", (e) => { drag = { x: e.clientX, y: e.clientY }; box.classList.add("dragging"); });
    window.addEventListener("mouseup", () => { drag = null; box.classList.remove("dragging"); });
    window.addEventListener("mousemove", (e) => {
      if (!drag) return;
      S.zoom.x += e.clientX - drag.x; S.zoom.y += e.clientY - drag.y;
      drag = { x: e.clientX, y: e.clientY };
      applyZoom();
    });
    box.addEventListener("dblclick", zoomReset);
    $("zoom-in").onclick = () => zoomBy(1.5);
    $("zoom-out").onclick = () => zoomBy(1 / 1.5);
    $("zoom-reset").onclick = zoomReset;
    window.addEventListener("resize", () => { if (S.item) zoomReset(); });
  }
  function compare(photo, caption) {
    const f = S.item.frames[S.frame];
    $("cmp-a").src = f.crop;
    $("cmp-b").src = photo.src;
    $("cmp-b-cap").textContent = caption;
    const m = $("cmp-m");
    $("cmp-m-fig").hidden = true;
    m.onload = () => { $("cmp-m-fig").hidden = false; };
    m.onerror = () => { $("cmp-m-fig").hidden = true; };
    m.src = `img/matches/${f.sha}/${f.idx}/${photo.kind}/${photo.id}`;
    $("compare").hidden = false;
  }

  // ------------------------------------------------------------------ decisions
  async function decide(body, label) {
    if (!S.item || S.busy) return;
    if (S.item.review) { toast("Already reviewed: undo that decision first (U).", false); return; }
    S.busy = true;
    const key = S.item.key;
    try {
      const res = await post("api/item/" + encodeURIComponent(key) + "/decide", { ...body, who: who() });
      S.mine.push(res.review.id);
      let msg = `Saved #${res.review.id}: ${label}. U undoes it.`;
      if (res.review.already_sent.length) msg += ` (${res.review.already_sent.length} frame(s) were already sent to the lab)`;
      await loadQueue(nextKey(key));
      toast(msg);
    } catch (e) {
      toast(e.message, false);
    } finally {
      S.busy = false;
    }
  }
  function nextKey(key) {
    // with "to review" shown the decided track leaves the list: the one after it takes its place
    const i = S.items.findIndex((it) => it.key === key);
    const rest = S.items.slice(i + 1).concat(S.items.slice(0, i)).filter((it) => !it.review);
    return rest.length ? rest[0].key : key;
  }
  function same(i, whole) {
    const c = S.item && S.item.candidates[i];
    if (!c) return;
    if (whole && !(S.item.identity && !S.item.identity.own && S.item.identity.id !== c.id)) {
      toast("Nothing to merge: this animal has no identity of its own other than the candidate.", false); return;
    }
    decide({ verdict: "same", identity: c.id, whole_identity: whole },
      whole ? `${S.item.identity.id} merged into ${c.id}` : `same as ${c.id}`);
  }
  function openForm(id, focus) {
    if (!S.item || S.item.review || !S.item.in_gallery) return;
    closeForms();
    $(id).hidden = false;
    $(focus).value = "";
    $(focus).focus();
  }
  function closeForms() {
    const a = document.activeElement;
    if (a && a.closest && a.closest(".inline-form")) a.blur();  // keys are shortcuts again
    $("new-form").hidden = true; $("species-form").hidden = true;
  }
  function saveNew() {
    const name = $("new-name").value.trim(), newId = $("new-id").value.trim();
    if (!name && !newId) { toast("Give the new individual a name.", false); $("new-name").focus(); return; }
    closeForms();
    decide({ verdict: "new", name: name || null, new_id: newId || null }, `new individual ${name || newId}`);
  }
  function saveSpecies() {
    const note = $("species-note").value.trim();
    closeForms();
    decide({ verdict: "other_species", note: note || null }, "not this species" + (note ? ` (${note})` : ""));
  }
  async function undo(reviewId) {
    if (S.busy) return;
    S.busy = true;
    try {
      const id = reviewId !== undefined ? reviewId : S.mine.length ? S.mine[S.mine.length - 1] : undefined;
      const res = await post("api/undo", id !== undefined ? { review: id, who: who() } : { who: who() });
      S.mine = S.mine.filter((x) => x !== res.review.id);
      await loadQueue(res.review.track);
      if (S.item && S.item.key !== res.review.track) {
        // the track is hidden by the filters: show it anyway
        S.item = await api("api/item/" + encodeURIComponent(res.review.track));
        S.frame = 0;
        render();
      }
      toast(`Undone #${res.review.id} (${res.review.verdict.replace("_", " ")}, track ${res.review.track}).`);
    } catch (e) {
      toast(e.message, false);
    } finally {
      S.busy = false;
    }
  }
  function move(d) {
    if (!S.items.length) return;
    select((S.index + d + S.items.length) % S.items.length);
  }

  // ------------------------------------------------------------------ keyboard
  function onKey(e) {
    const typing = e.target instanceof HTMLInputElement || e.target instanceof HTMLSelectElement;
    if (e.key === "Escape") {
      $("compare").hidden = true; $("help").hidden = true; closeForms();
      if (typing) e.target.blur();
      return;
    }
    if (typing) {
      if (e.key === "Enter" && !$("new-form").hidden) { e.preventDefault(); saveNew(); }
      else if (e.key === "Enter" && !$("species-form").hidden) { e.preventDefault(); saveSpecies(); }
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) {
      if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "z") { e.preventDefault(); undo(); }
      return;
    }
    const digit = /^Digit([1-9])$/.exec(e.code);
    if (digit) { e.preventDefault(); same(Number(digit[1]) - 1, e.shiftKey); return; }
    const k = e.key.toLowerCase();
    const acts = {
      n: () => openForm("new-form", "new-name"), o: () => openForm("species-form", "species-note"),
      x: () => decide({ verdict: "not_animal" }, "not an animal"), s: () => move(1), arrowright: () => move(1),
      j: () => move(1), arrowleft: () => move(-1), k: () => move(-1), u: () => undo(),
      "+": () => zoomBy(1.5), "=": () => zoomBy(1.5), "-": () => zoomBy(1 / 1.5), 0: () => zoomReset(),
      "[": () => { if (S.item) { S.frame = (S.frame + S.item.frames.length - 1) % S.item.frames.length; renderFrames(); } },
      "]": () => { if (S.item) { S.frame = (S.frame + 1) % S.item.frames.length; renderFrames(); } },
      "?": () => { $("help").hidden = !$("help").hidden; },
    };
    if (acts[k]) { e.preventDefault(); acts[k](); }
  }

  // ------------------------------------------------------------------ start
  async function start() {
    $("who").value = localStorage.getItem("fieldreid-reviewer") || DEFAULT_WHO;
    $("who").addEventListener("change", () => localStorage.setItem("fieldreid-reviewer", $("who").value.trim()));
    document.addEventListener("keydown", onKey);
    setupZoom();
    $("undo").onclick = () => undo();
    $("help-btn").onclick = () => { $("help").hidden = false; };
    for (const o of ["compare", "help"]) $(o).onclick = () => { $(o).hidden = true; };
    $("act-new").onclick = () => openForm("new-form", "new-name");
    $("act-species").onclick = () => openForm("species-form", "species-note");
    $("act-notanimal").onclick = () => decide({ verdict: "not_animal" }, "not an animal");
    $("act-skip").onclick = () => move(1);
    $("new-save").onclick = saveNew; $("new-cancel").onclick = closeForms;
    $("species-save").onclick = saveSpecies; $("species-cancel").onclick = closeForms;
    $("filters").addEventListener("change", () => loadQueue(S.item && S.item.key).catch((e) => toast(e.message, false)));
    $("filters").addEventListener("submit", (e) => e.preventDefault());
    try {
      const info = await api("api/info");
      for (const c of info.options.cameras) $("f-camera").append(el("option", { value: c, text: c }));
      for (const s of info.options.species) $("f-species").append(el("option", { value: s, text: s }));
      if (info.options.from) { $("f-from").min = $("f-to").min = info.options.from; }
      if (info.options.to) { $("f-from").max = $("f-to").max = info.options.to; }
      await loadQueue();
    } catch (e) {
      toast(e.message, false);
    }
    document.body.dataset.ready = "1";
  }
  start();
})();
