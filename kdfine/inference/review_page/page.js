"use strict";
// The review page of kdfine detect-noise --review: the data is the JSON block above (written by
// kdfine/inference/review.py); nothing is fetched. Names are set as text (never parsed as HTML).
(function () {
  const D = JSON.parse(document.getElementById("review-data").textContent);
  const S = D.suspects;                       // columns, most likely wrong first
  const N = S.index.length;
  const K = D.classes.length;
  const PAGE = D.page_size;
  const KEY = "kdfine-review:" + D.id;         // local storage of the decisions of this page
  const decisions = new Map();                 // position in S -> {kind: keep|relabel|drop, label}
  let view = [];                               // positions shown, after the filters
  let page = 0, cursor = 0;                    // cursor: position in view

  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const name = (c) => D.classes[c] === String(c) ? String(c) : D.classes[c] + " (" + c + ")";
  const fmt = (x) => Number(x).toFixed(3);

  // ------------------------------------------------------------------ decisions and their storage
  function load() {
    try {
      const saved = JSON.parse(localStorage.getItem(KEY) || "{}");
      for (let i = 0; i < N; i++) {
        const d = saved[S.index[i]];
        if (d && ["keep", "relabel", "drop"].includes(d.kind) && Number.isInteger(d.label)) decisions.set(i, d);
      }
    } catch (e) { /* storage unavailable: decisions live as long as the page */ }
  }
  function save() {
    try {
      const out = {};
      decisions.forEach((d, i) => { out[S.index[i]] = d; });
      localStorage.setItem(KEY, JSON.stringify(out));
    } catch (e) { /* storage unavailable or full */ }
  }
  function decide(i, kind, label) {
    if (kind === null) decisions.delete(i);
    else decisions.set(i, {kind: kind, label: kind === "relabel" ? label : S.label[i]});
    save();
  }
  // the decision that counts for position i: the reviewer's, else the policy for undecided suspects
  function effective(i) {
    const d = decisions.get(i);
    if (d) return d;
    const policy = $("policy").value;
    if (policy === "keep") return {kind: "keep", label: S.label[i]};
    if (policy === "suggest") {
      return S.p[i] >= D.min_p && S.suggested[i] !== S.label[i]
        ? {kind: "relabel", label: S.suggested[i]} : {kind: "keep", label: S.label[i]};
    }
    return {kind: "drop", label: S.label[i]};
  }

  // ------------------------------------------------------------------ export
  function labelsCsv() {
    const y = D.labels.slice();
    for (let i = 0; i < N; i++) y[S.index[i]] = effective(i).label;
    const rows = ["index,label"];
    for (let j = 0; j < y.length; j++) rows.push(j + "," + y[j]);
    return rows.join("\n") + "\n";
  }
  function keepCsv() {
    const y = D.labels.slice();
    const kept = new Uint8Array(y.length).fill(1);
    for (let i = 0; i < N; i++) {
      const d = effective(i);
      if (d.kind === "drop") kept[S.index[i]] = 0;
      y[S.index[i]] = d.label;
    }
    const rows = ["index,label"];
    for (let j = 0; j < y.length; j++) if (kept[j]) rows.push(j + "," + y[j]);
    return rows.join("\n") + "\n";
  }
  function download(name, text) {
    const url = URL.createObjectURL(new Blob([text], {type: "text/csv"}));
    const a = el("a");
    a.href = url;
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // ------------------------------------------------------------------ filters
  function stateOf(i) { const d = decisions.get(i); return d ? d.kind : "undecided"; }
  function applyFilters(keepPosition) {
    const cls = $("f-class").value, pair = $("f-pair").value, state = $("f-state").value;
    const before = view[cursor];
    view = [];
    for (let i = 0; i < N; i++) {
      if (cls !== "" && S.label[i] !== Number(cls)) continue;
      if (pair !== "" && S.label[i] + ">" + S.suggested[i] !== pair) continue;
      if (state !== "all" && stateOf(i) !== state) continue;
      view.push(i);
    }
    const at = keepPosition ? view.indexOf(before) : -1;
    cursor = at >= 0 ? at : 0;
    page = Math.floor(cursor / PAGE);
    render();
  }
  function fillFilters() {
    const perClass = new Array(K).fill(0), pairs = new Map();
    for (let i = 0; i < N; i++) {
      perClass[S.label[i]]++;
      const key = S.label[i] + ">" + S.suggested[i];
      pairs.set(key, (pairs.get(key) || 0) + 1);
    }
    const fc = $("f-class");
    fc.appendChild(new Option("all (" + N + ")", ""));
    perClass.forEach((n, c) => { if (n) fc.appendChild(new Option(name(c) + " (" + n + ")", String(c))); });
    const fp = $("f-pair");
    fp.appendChild(new Option("all", ""));
    [...pairs.entries()].sort((a, b) => b[1] - a[1]).forEach(([key, n]) => {
      const [g, s] = key.split(">").map(Number);
      fp.appendChild(new Option(name(g) + " \u2192 " + name(s) + " (" + n + ")", key));
    });
    return pairs;
  }

  // ------------------------------------------------------------------ the summary
  function confusion(pairs) {
    const box = $("confusion");
    const given = [...new Set(S.label)].sort((a, b) => a - b);
    const sugg = [...new Set(S.suggested)].sort((a, b) => a - b);
    if (given.length > 20 || sugg.length > 20) {  // too wide for a table: the most frequent pairs
      const list = el("ol");
      [...pairs.entries()].sort((a, b) => b[1] - a[1]).slice(0, 30).forEach(([key, n]) => {
        const [g, s] = key.split(">").map(Number);
        const li = el("li", "hit", name(g) + " \u2192 " + name(s) + ": " + n);
        li.dataset.pair = key;
        list.appendChild(li);
      });
      box.appendChild(list);
      return;
    }
    const t = el("table"), head = el("tr");
    head.appendChild(el("th", "", "given \u2193 / suggested \u2192"));
    sugg.forEach((s) => head.appendChild(el("th", "", name(s))));
    t.appendChild(head);
    given.forEach((g) => {
      const tr = el("tr");
      tr.appendChild(el("th", "", name(g)));
      sugg.forEach((s) => {
        const n = pairs.get(g + ">" + s) || 0;
        const td = el("td", n ? "hit" : "", n ? String(n) : "");
        if (n) td.dataset.pair = g + ">" + s;
        tr.appendChild(td);
      });
      t.appendChild(tr);
    });
    box.appendChild(t);
  }

  // ------------------------------------------------------------------ cards
  function card(i) {
    const d = decisions.get(i);
    const a = el("article", "suspect" + (d ? " " + d.kind : ""));
    a.dataset.index = String(S.index[i]);
    a.dataset.pos = String(i);
    a.tabIndex = -1;
    if (S.thumb[i]) {
      const img = el("img", "thumb");
      img.src = S.thumb[i];
      img.alt = "sample " + S.index[i];
      a.appendChild(img);
    } else {
      a.appendChild(el("div", "noimg", "no image"));
    }
    a.appendChild(el("div", "idx", "#" + S.index[i]));
    const path = el("div", "path");  // right-to-left box, left-to-right text: a long path loses its start
    if (S.path) {
      path.appendChild(el("span", "", S.path[i]));
      path.title = S.path[i];
    }
    a.appendChild(path);
    const labels = el("div", "labels");
    labels.appendChild(document.createTextNode("given "));
    labels.appendChild(el("b", "given", name(S.label[i])));
    labels.appendChild(document.createTextNode(" \u2192 suggested "));
    labels.appendChild(el("b", "suggested", name(S.suggested[i])));
    labels.appendChild(document.createTextNode(" (p " + fmt(S.p[i]) + ")"));
    a.appendChild(labels);
    a.appendChild(el("div", "nums", "score " + fmt(S.score[i]) + " \u00b7 p_clean " + fmt(S.p_clean[i])));
    a.appendChild(el("div", "state", d ? describe(d, i) : ""));
    a.appendChild(actions(i));
    return a;
  }
  function describe(d, i) {
    if (d.kind === "keep") return "keep " + name(S.label[i]);
    if (d.kind === "drop") return "drop";
    return "relabel to " + name(d.label);
  }
  function actions(i) {
    const box = el("div", "actions");
    const button = (text, act, title) => {
      const b = el("button", "act-" + act, text);
      b.type = "button";
      b.title = title;
      b.dataset.act = act;
      box.appendChild(b);
    };
    button("keep", "keep", "the given label is right (a)");
    button("\u2192 " + name(S.suggested[i]), "relabel", "relabel to the suggestion (r)");
    const sel = el("select", "other");
    sel.title = "relabel to another class (c)";
    sel.appendChild(new Option("class\u2026", ""));
    D.classes.forEach((_, c) => sel.appendChild(new Option(name(c), String(c))));
    box.appendChild(sel);
    button("drop", "drop", "the image does not belong (d)");
    return box;
  }
  function render() {
    const grid = $("grid");
    grid.replaceChildren();
    const pages = Math.max(1, Math.ceil(view.length / PAGE));
    page = Math.min(Math.max(page, 0), pages - 1);
    $("page-of").textContent = "page " + (page + 1) + " of " + pages + " \u00b7 " + view.length + " shown";
    if (!view.length) grid.appendChild(el("p", "empty", "No suspect matches the filters."));
    view.slice(page * PAGE, page * PAGE + PAGE).forEach((i) => grid.appendChild(card(i)));
    counts();
    focus(false);
  }
  function counts() {
    const c = {keep: 0, relabel: 0, drop: 0};
    decisions.forEach((d) => { c[d.kind]++; });
    $("counts").textContent = "decided " + decisions.size + " of " + N + ": keep " + c.keep + ", relabel " +
      c.relabel + ", drop " + c.drop;
  }
  function focus(scroll) {
    document.querySelectorAll(".suspect.current").forEach((e) => e.classList.remove("current"));
    const e = document.querySelector('.suspect[data-pos="' + view[cursor] + '"]');
    if (!e) return;
    e.classList.add("current");
    if (scroll) e.scrollIntoView({block: "nearest"});
  }
  function move(to) {
    if (!view.length) return;
    cursor = Math.min(Math.max(to, 0), view.length - 1);
    const p = Math.floor(cursor / PAGE);
    if (p !== page) { page = p; render(); }
    focus(true);
  }
  function refresh(i) {  // redraw one card after a decision, in place
    const old = document.querySelector('.suspect[data-pos="' + i + '"]');
    if (old) old.replaceWith(card(i));
    counts();
    focus(false);
  }
  function act(i, kind, label) {
    decide(i, kind, label);
    refresh(i);
    if (kind !== null && view[cursor] === i) move(cursor + 1);
  }

  // ------------------------------------------------------------------ events
  function onKey(ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const t = ev.target;
    if (t && (t.tagName === "SELECT" || t.tagName === "INPUT") && ev.key !== "Escape") return;
    const i = view[cursor];
    const k = ev.key;
    let done = true;
    if (k === "j" || k === "ArrowRight" || k === "ArrowDown") move(cursor + 1);
    else if (k === "k" || k === "ArrowLeft" || k === "ArrowUp") move(cursor - 1);
    else if (k === "n" || k === "PageDown") move((page + 1) * PAGE);
    else if (k === "p" || k === "PageUp") move((page - 1) * PAGE);
    else if (k === "?") toggleHelp();
    else if (k === "Escape") { if (t && t.blur) t.blur(); }
    else if (i === undefined) done = false;
    else if (k === "a" || k === "y") act(i, "keep");
    else if (k === "r" || k === "s") act(i, "relabel", S.suggested[i]);
    else if (k === "d" || k === "x") act(i, "drop");
    else if (k === "u" || k === "Backspace") act(i, null);
    else if (/^[0-9]$/.test(k) && Number(k) < K) act(i, "relabel", Number(k));
    else if (k === "c") {
      const sel = document.querySelector('.suspect[data-pos="' + i + '"] select.other');
      if (sel) sel.focus();
    } else done = false;
    if (done) ev.preventDefault();
  }
  function onClick(ev) {
    const cell = ev.target.closest("[data-pair]");
    if (cell) {
      $("f-pair").value = cell.dataset.pair;
      $("f-class").value = "";
      applyFilters(false);
      document.querySelectorAll("#confusion .on").forEach((e) => e.classList.remove("on"));
      cell.classList.add("on");
      return;
    }
    const c = ev.target.closest(".suspect");
    if (!c) return;
    const i = Number(c.dataset.pos);
    const at = view.indexOf(i);
    if (at >= 0) { cursor = at; focus(false); }
    const b = ev.target.closest("button[data-act]");
    if (b) act(i, b.dataset.act, S.suggested[i]);
  }
  function onChange(ev) {
    const sel = ev.target.closest("select.other");
    if (!sel || sel.value === "") return;
    const i = Number(sel.closest(".suspect").dataset.pos);
    const c = Number(sel.value);
    sel.blur();
    act(i, c === S.label[i] ? "keep" : "relabel", c);
  }
  function toggleHelp() {
    const h = $("help");
    h.hidden = !h.hidden;
    $("help-toggle").setAttribute("aria-expanded", String(!h.hidden));
  }

  // ------------------------------------------------------------------ start
  document.title = D.title;
  $("title").textContent = D.title;
  $("facts").textContent = N + " suspects of " + D.labels.length + " samples (" + D.data + ", " + D.split +
    " split) \u00b7 " + D.method + " \u00b7 suggestions from " + D.evidence + " \u00b7 --relabel-min-p " + D.min_p;
  load();
  confusion(fillFilters());
  ["f-class", "f-pair", "f-state"].forEach((id) => $(id).addEventListener("change", () => applyFilters(true)));
  $("policy").value = D.policy;
  $("policy").addEventListener("change", counts);
  $("prev").addEventListener("click", () => move((page - 1) * PAGE));
  $("next").addEventListener("click", () => move((page + 1) * PAGE));
  $("help-toggle").addEventListener("click", toggleHelp);
  $("dl-labels").addEventListener("click", () => download(D.stem + ".labels.csv", labelsCsv()));
  $("dl-keep").addEventListener("click", () => download(D.stem + ".keep.csv", keepCsv()));
  document.addEventListener("keydown", onKey);
  document.addEventListener("click", onClick);
  document.addEventListener("change", onChange);
  window.kdfineReview = {labelsCsv: labelsCsv, keepCsv: keepCsv, decisions: decisions};  // for tests and the console
  applyFilters(false);
})();
