// tagd web UI: autocomplete, endless scroll, sidebar, threshold slider, review, queue actions.
// Plain DOM; every piece of user data is inserted with textContent, never as HTML.
"use strict";
(function () {
  const meta = (n) => (document.querySelector(`meta[name="${n}"]`) || {}).content || "";
  const BASE = meta("tagd-base");
  const CSRF = meta("tagd-csrf");
  const $ = (s, r) => (r || document).querySelector(s);
  const $$ = (s, r) => Array.from((r || document).querySelectorAll(s));
  const getJSON = (url) => fetch(BASE + url, { credentials: "same-origin" }).then((r) => r.json());
  const post = (url, body) =>
    fetch(BASE + url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": CSRF },
      body: JSON.stringify(body || {}),
    }).then(async (r) => {
      const data = await r.json();
      if (!r.ok) throw new Error(data.error || r.statusText);
      return data;
    });
  const qs = (o) => new URLSearchParams(o).toString();
  // A random grid's seed travels with every page and link, so its order never changes.
  const seeded = (o, seed) => (seed ? { ...o, seed } : o);

  // ---- query box: autocomplete on the word under the caret
  const q = $("#q");
  const ac = $("#ac");
  let acItems = [], acIndex = -1, acSeq = 0;
  function currentWord() {
    const end = q.selectionStart ?? q.value.length;
    const start = q.value.lastIndexOf(" ", end - 1) + 1;
    let word = q.value.slice(start, end);
    let lead = 0;
    while (lead < word.length && "-(".includes(word[lead])) lead++;
    return { start: start + lead, end, word: word.slice(lead) };
  }
  function closeAc() { ac.hidden = true; acItems = []; acIndex = -1; ac.textContent = ""; }
  function pick(i) {
    const item = acItems[i];
    if (!item) return;
    const { start, end } = currentWord();
    const text = item.namespace === "general" ? item.tag : `${item.namespace}:${item.tag}`;
    const rest = q.value.slice(end);
    q.value = q.value.slice(0, start) + text + (rest.startsWith(" ") ? "" : " ") + rest;
    const caret = start + text.length + 1;
    q.setSelectionRange(caret, caret);
    closeAc();
    q.focus();
  }
  function renderAc() {
    ac.textContent = "";
    acItems.forEach((item, i) => {
      const li = document.createElement("li");
      li.className = `ns-${item.namespace}` + (i === acIndex ? " active" : "");
      li.dataset.value = item.tag;
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = item.namespace === "general" ? item.tag : `${item.namespace}:${item.tag}`;
      const n = document.createElement("span");
      n.className = "n";
      n.textContent = item.count.toLocaleString();
      li.append(name, n);
      li.addEventListener("mousedown", (e) => { e.preventDefault(); pick(i); });
      ac.append(li);
    });
    ac.hidden = acItems.length === 0;
  }
  if (q) {
    q.addEventListener("input", () => {
      const { word } = currentWord();
      if (!word || word.includes("..") || /:[<>=]/.test(word)) return closeAc();
      const seq = ++acSeq;
      getJSON(`/api/tags?${qs({ prefix: word, limit: 12 })}`).then((items) => {
        if (seq !== acSeq || !Array.isArray(items)) return;
        acItems = items; acIndex = items.length ? 0 : -1; renderAc();
      });
    });
    q.addEventListener("keydown", (e) => {
      if (ac.hidden) return;
      if (e.key === "ArrowDown" || e.key === "ArrowUp") {
        e.preventDefault();
        const d = e.key === "ArrowDown" ? 1 : -1;
        acIndex = (acIndex + d + acItems.length) % acItems.length;
        renderAc();
      } else if (e.key === "Tab" || (e.key === "Enter" && acIndex >= 0)) {
        e.preventDefault(); pick(acIndex);
      } else if (e.key === "Escape") closeAc();
    });
    q.addEventListener("blur", () => setTimeout(closeAc, 150));
  }
  const go = (query) => {
    const sort = ($("#sort") || {}).value || "score";
    location.href = `${BASE}/?${qs({ q: query, sort })}`;
  };

  // ---- sidebar: click adds the tag, alt/shift-click adds it negated
  $$("#sidebar a.tag").forEach((a) =>
    a.addEventListener("click", (e) => {
      e.preventDefault();
      const term = (e.altKey || e.shiftKey ? "-" : "") + a.dataset.tag;
      go((q.value.trim() + " " + term).trim());
    })
  );
  $$("a.suggest").forEach((a) =>
    a.addEventListener("click", (e) => {
      e.preventDefault();
      const words = q.value.split(" ").map((w) => (w.replace(/^[-(]+/, "").replace(/^[a-z]+:/, "") === a.dataset.from ? w.replace(a.dataset.from, a.dataset.to) : w));
      go(words.join(" "));
    })
  );

  // ---- grid: count when ready, endless scroll
  const count = $("#count");
  if (count && count.dataset.pending) {
    getJSON(`/api/count?${qs({ q: count.dataset.q })}`).then((d) => {
      if (typeof d.count === "number") { count.textContent = d.count.toLocaleString(); delete count.dataset.pending; }
    });
  }
  const grid = $("#grid");
  const more = $("#more");
  if (grid && grid.dataset.seed) {
    const url = new URL(location.href);
    if (url.searchParams.get("seed") !== grid.dataset.seed) {
      url.searchParams.set("seed", grid.dataset.seed);
      history.replaceState(null, "", url);
    }
  }
  if (grid && more && "IntersectionObserver" in window) {
    let loading = false;
    const obs = new IntersectionObserver((entries) => {
      if (!entries.some((e) => e.isIntersecting) || loading) return;
      loading = true;
      const offset = Number(more.dataset.offset);
      const seed = grid.dataset.seed;
      const params = seeded({ q: grid.dataset.q, sort: grid.dataset.sort, offset, limit: 100, count: 0 }, seed);
      getJSON(`/api/search?${qs(params)}`).then((d) => {
        (d.hits || []).forEach((h, i) => {
          const a = document.createElement("a");
          a.className = "cell";
          a.title = h.path;
          a.href = `${BASE}/image/${h.sha256}?${qs(seeded({ q: grid.dataset.q, sort: grid.dataset.sort, i: offset + i }, seed))}`;
          const img = document.createElement("img");
          img.src = `${BASE}/thumbs/${h.sha256}`;
          img.alt = h.path;
          img.loading = "lazy";
          a.append(img);
          grid.append(a);
        });
        if (!d.hits || d.hits.length < 100) { obs.disconnect(); more.remove(); }
        else more.dataset.offset = String(offset + d.hits.length);
        loading = false;
      });
    }, { rootMargin: "800px" });
    obs.observe(more);
  }

  // ---- image page
  const page = $("#imagepage");
  if (page) {
    const sha = page.dataset.sha;
    const full = $("#full");
    $("#fit").addEventListener("click", (e) => {
      e.preventDefault();
      full.classList.toggle("fit");
      e.target.textContent = full.classList.contains("fit") ? "full size" : "fit";
    });
    const pos = Number(page.dataset.pos);
    const step = (d) => {
      if (pos < 0 || pos + d < 0) return;
      const seed = page.dataset.seed;
      const params = seeded({ q: page.dataset.q, sort: page.dataset.sort, offset: pos + d, limit: 1, count: 0 }, seed);
      getJSON(`/api/search?${qs(params)}`).then((r) => {
        const h = (r.hits || [])[0];
        if (h) location.href = `${BASE}/image/${h.sha256}?${qs(seeded({ q: page.dataset.q, sort: page.dataset.sort, i: pos + d }, seed))}`;
      });
    };
    const prev = $("#prev"), next = $("#next");
    if (prev) prev.addEventListener("click", (e) => { e.preventDefault(); step(-1); });
    if (next) next.addEventListener("click", (e) => { e.preventDefault(); step(1); });
    document.addEventListener("keydown", (e) => {
      if (e.target.tagName === "INPUT") return;
      if (e.key === "ArrowLeft" || e.key === "k") step(-1);
      if (e.key === "ArrowRight" || e.key === "j") step(1);
    });
    // The similar strip and near duplicates arrive after the page (an exact scan of every
    // embedding can take longer than the page itself).
    getJSON(`/api/similar/${sha}?limit=12`).then((d) => {
      const strip = $("#similar");
      strip.textContent = "";
      (d.similar || []).forEach((s) => {
        const a = document.createElement("a");
        a.href = `${BASE}/image/${s.sha256}`;
        a.title = `${s.path} (${s.similarity.toFixed(3)})`;
        const img = document.createElement("img");
        img.src = `${BASE}/thumbs/${s.sha256}`;
        img.alt = s.path;
        img.loading = "lazy";
        a.append(img);
        strip.append(a);
      });
      if (!(d.similar || []).length) {
        const none = document.createElement("span");
        none.className = "muted";
        none.textContent = "no embeddings for this image";
        strip.append(none);
      }
      const dupes = $("#dupes");
      (d.near_duplicates || []).forEach((n) => {
        const li = document.createElement("li");
        const a = document.createElement("a");
        a.href = `${BASE}/image/${n.sha256}`;
        a.textContent = n.path;
        li.append(`near (${n.similarity.toFixed(3)}): `, a);
        dupes.append(li);
      });
      if (!dupes.children.length) {
        const li = document.createElement("li");
        li.className = "muted";
        li.textContent = "none";
        dupes.append(li);
      }
    });
    // Confidence bars, and the threshold slider: which tags this threshold would select.
    $$("section.model").forEach((sec) => {
      const items = $$("li[data-score]", sec);
      items.forEach((li) => { $(".bar", li).style.width = `${(Number(li.dataset.score) * 100).toFixed(1)}%`; });
      const slider = $("input.threshold", sec);
      const out = $("output", sec);
      const redraw = () => {
        const t = Number(slider.value);
        out.textContent = t.toFixed(2);
        const ratings = items.filter((li) => li.dataset.ns === "rating");
        const top = ratings.reduce((a, b) => (!a || Number(b.dataset.score) > Number(a.dataset.score) ? b : a), null);
        items.forEach((li) => {
          const on = li.dataset.ns === "rating" ? li === top : Number(li.dataset.score) >= t;
          li.classList.toggle("sel", on);
        });
      };
      slider.addEventListener("input", redraw);
    });
    const review = (body) => post(`/api/files/${sha}/review`, body).then(() => location.reload(), (err) => alert(err.message));
    $$("button.rv").forEach((b) =>
      b.addEventListener("click", () => {
        const v = Number(b.dataset.verdict);
        review(v > 0 ? { accept: [b.dataset.tag] } : v < 0 ? { reject: [b.dataset.tag] } : { clear: [b.dataset.tag] });
      })
    );
    const add = $("#addtag");
    if (add) add.addEventListener("submit", (e) => {
      e.preventDefault();
      const t = $("#newtag").value.trim();
      if (t) review({ accept: [t] });
    });
  }

  // ---- queue page
  $$("button.qa").forEach((b) =>
    b.addEventListener("click", () => post(`/api/queue/${b.dataset.action}`).then(() => location.reload(), (err) => alert(err.message)))
  );
})();
