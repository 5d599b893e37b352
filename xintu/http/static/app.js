// Xintu album page: hash in the browser, ask the cache, upload only the misses.
// Plain JavaScript, no dependencies; every value from the server is set with
// textContent (never innerHTML).
"use strict";

(() => {
  const API = "/api/v1/classify";
  const CATEGORIES = [
    ["social_activities", "Social activities"],
    ["pets", "Pets"],
    ["single_person", "Single person"],
    ["foods", "Foods"],
    ["travel_scenery", "Travel & scenery"],
    ["screenshot", "Screenshots"],
    ["idcard", "ID cards"],
    ["other", "Other"],
  ];
  const LABELS = Object.fromEntries(CATEGORIES);
  const CHECK_CHUNK = 100; // batch-check-cache limit
  const UPLOADS_IN_FLIGHT = 3;
  const MAX_ATTEMPTS = 4;
  const MAX_RETRY_WAIT_S = 30;
  const POLL_MS = 3000;

  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  };

  const session = { photos: 0, done: 0, cached: 0, failed: 0, sources: {} };
  let seq = 0;

  // --- settings (session storage only) ---------------------------------------------

  const keyInput = $("api-key");
  const userInput = $("user-id");
  keyInput.value = sessionStorage.getItem("xintu.apiKey") || "";
  userInput.value = sessionStorage.getItem("xintu.userId") || "";
  keyInput.addEventListener("change", () => sessionStorage.setItem("xintu.apiKey", keyInput.value));
  userInput.addEventListener("change", () => sessionStorage.setItem("xintu.userId", userInput.value));

  function headers(extra) {
    const h = Object.assign({ Accept: "application/json" }, extra || {});
    if (keyInput.value) h.Authorization = "Bearer " + keyInput.value;
    if (userInput.value) h["X-User-ID"] = userInput.value;
    return h;
  }

  function newKey() {
    if (crypto.randomUUID) return crypto.randomUUID();
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function showMessage(text) {
    const m = $("message");
    m.textContent = text || "";
    m.hidden = !text;
  }

  // --- HTTP with retries -------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.error) || "HTTP " + status);
      this.status = status;
      this.code = (body && body.error_code) || null;
      this.requestId = (body && body.request_id) || null;
    }
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  // One logical POST: the same Idempotency-Key and the same bytes for every retry of
  // 409/429/503 (the server fingerprints keyed requests by their exact bytes).
  // build(key) returns {body, type}; it is called once.
  async function post(path, build) {
    const key = newKey();
    const { body: payload, type } = build(key);
    for (let attempt = 1; ; attempt++) {
      const init = {
        method: "POST",
        headers: headers({ "Idempotency-Key": key, "Content-Type": type }),
        body: payload,
      };
      let response;
      try {
        response = await fetch(path, init);
      } catch (err) {
        if (attempt >= MAX_ATTEMPTS) throw new ApiError(0, { error: "the service cannot be reached" });
        await sleep(500 * 2 ** attempt);
        continue;
      }
      let body = null;
      try { body = await response.json(); } catch (_) { body = null; }
      if (response.ok) return body;
      if ([409, 429, 503].includes(response.status) && attempt < MAX_ATTEMPTS) {
        const after = Number(response.headers.get("Retry-After"));
        const wait = Number.isFinite(after) && after >= 0 ? after : 2 ** attempt;
        if (wait <= MAX_RETRY_WAIT_S) {
          await sleep(wait * 1000);
          continue;
        }
      }
      throw new ApiError(response.status, body);
    }
  }

  const json = (value) => () => ({ body: JSON.stringify(value), type: "application/json" });

  // multipart/form-data with a boundary of its own, built once (FormData would pick a
  // new random boundary for every send).
  function multipart(file, fields) {
    return (key) => {
      const boundary = "xintu-" + key.replace(/[^0-9a-zA-Z]/g, "");
      const quote = (s) => String(s).replace(/[\r\n"\\]/g, "_");
      const parts = [];
      for (const [name, value] of Object.entries(fields)) {
        parts.push(`--${boundary}\r\nContent-Disposition: form-data; name="${name}"\r\n\r\n${value}\r\n`);
      }
      parts.push(
        `--${boundary}\r\nContent-Disposition: form-data; name="image"; filename="${quote(file.name)}"\r\n` +
        `Content-Type: ${file.type || "application/octet-stream"}\r\n\r\n`,
        file,
        `\r\n--${boundary}--\r\n`);
      return { body: new Blob(parts), type: `multipart/form-data; boundary=${boundary}` };
    };
  }

  // --- hashing ---------------------------------------------------------------------------

  // SubtleCrypto exists only in a secure context (https, localhost, 127.0.0.1).
  async function sha256(file) {
    if (!(window.crypto && crypto.subtle)) return null;
    const digest = await crypto.subtle.digest("SHA-256", await file.arrayBuffer());
    return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // --- the photo grid --------------------------------------------------------------------

  function group(key, title, extraClass) {
    let section = document.querySelector(`.group[data-category="${key}"]`);
    if (section) return section;
    section = el("section", "group " + (extraClass || ""));
    section.dataset.category = key;
    const h = el("h2", null, title);
    h.append(" ", el("span", "count", "0"));
    section.append(h, el("div", "grid"));
    // Keep the canonical order: pending first, categories, failures last.
    const order = ["__pending", ...CATEGORIES.map((c) => c[0]), "__failed"];
    const groups = $("groups");
    const after = Array.from(groups.querySelectorAll(".group")).find(
      (g) => order.indexOf(g.dataset.category) > order.indexOf(key));
    groups.insertBefore(section, after || null);
    $("empty").hidden = true;
    return section;
  }

  function recount() {
    for (const section of document.querySelectorAll(".group")) {
      const n = section.querySelectorAll(".card").length;
      section.querySelector(".count").textContent = String(n);
      section.hidden = n === 0;
    }
  }

  function makeCard(job) {
    const card = $("card-template").content.firstElementChild.cloneNode(true);
    card.classList.add("pending");
    card.dataset.name = job.file.name;
    card.querySelector(".name").textContent = job.file.name;
    card.querySelector(".name").title = job.file.name;
    card.querySelector(".conf").textContent = "waiting…";
    const img = card.querySelector("img");
    job.url = URL.createObjectURL(job.file);
    img.src = job.url;
    img.alt = job.file.name;
    img.addEventListener("error", () => {
      // e.g. HEIC, which Chromium cannot draw: show the extension instead.
      const ext = (job.file.name.split(".").pop() || "image").toUpperCase();
      img.replaceWith(el("span", null, ext));
    });
    group("__pending", "Classifying", "group-pending").querySelector(".grid").append(card);
    job.card = card;
    recount();
  }

  function settle(job, data, fromCache) {
    const card = job.card;
    card.classList.remove("pending");
    const source = fromCache ? "cache" : data.source || "local";
    card.dataset.category = data.category;
    card.dataset.source = source;
    const pct = Math.round((Number(data.confidence) || 0) * 100);
    card.querySelector(".conf").textContent = pct + "%";
    const badge = card.querySelector(".badge");
    badge.textContent = source;
    badge.className = "badge badge-" + source;
    card.querySelector(".confbar-fill").style.width = pct + "%";
    if (data.description) card.title = data.description;
    const title = LABELS[data.category] || data.category;
    group(data.category, title).querySelector(".grid").append(card);
    session.done += 1;
    if (fromCache) session.cached += 1;
    session.sources[source] = (session.sources[source] || 0) + 1;
    recount();
    progress();
    renderSession();
  }

  function fail(job, err) {
    const card = job.card;
    card.classList.remove("pending");
    card.classList.add("failed");
    card.querySelector(".conf").textContent = err.message;
    card.title = err.code ? `${err.code} (request ${err.requestId || "?"})` : err.message;
    const badge = card.querySelector(".badge");
    badge.textContent = err.status ? String(err.status) : "error";
    badge.className = "badge badge-error";
    group("__failed", "Could not classify", "group-failed").querySelector(".grid").append(card);
    session.failed += 1;
    if (err.status === 401 || err.status === 403) {
      showMessage("The service needs an API key: open “Connection settings”.");
    }
    recount();
    progress();
    renderSession();
  }

  function progress() {
    const finished = session.done + session.failed;
    $("progress").hidden = session.photos === 0;
    $("progress-fill").style.width = (session.photos ? (100 * finished) / session.photos : 0) + "%";
    $("progress-text").textContent =
      `${finished} of ${session.photos} photos done · ${session.cached} from cache` +
      (session.failed ? ` · ${session.failed} failed` : "");
  }

  // --- the upload protocol ---------------------------------------------------------------

  async function checkCache(jobs) {
    const hashed = jobs.filter((j) => j.hash);
    for (let i = 0; i < hashed.length; i += CHECK_CHUNK) {
      const chunk = hashed.slice(i, i + CHECK_CHUNK);
      const unique = [...new Set(chunk.map((j) => j.hash))];
      try {
        const body = await post(`${API}/batch-check-cache`, json({ image_hashes: unique }));
        const hits = new Map();
        for (const item of body.items || []) if (item.cached && item.data) hits.set(item.image_hash, item.data);
        for (const job of chunk) {
          if (hits.has(job.hash)) {
            job.done = true;
            settle(job, hits.get(job.hash), true);
          }
        }
      } catch (err) {
        if (err.status === 401 || err.status === 403) throw err;
        // Anything else: upload instead (the server hashes and caches anyway).
      }
    }
  }

  async function upload(job) {
    try {
      const body = await post(API, multipart(job.file, job.hash ? { image_hash: job.hash } : {}));
      settle(job, body.data, body.from_cache);
    } catch (err) {
      fail(job, err);
    }
  }

  async function handleFiles(fileList) {
    const files = Array.from(fileList);
    if (!files.length) return;
    showMessage("");
    const jobs = files.map((file) => ({ id: ++seq, file, hash: null, done: false }));
    session.photos += jobs.length;
    jobs.forEach(makeCard);
    progress();
    for (const job of jobs) {
      try { job.hash = await sha256(job.file); } catch (_) { job.hash = null; }
    }
    try {
      await checkCache(jobs);
    } catch (err) {
      jobs.filter((j) => !j.done).forEach((j) => fail(j, err));
      return;
    }
    const queue = jobs.filter((j) => !j.done);
    const workers = Array.from({ length: Math.min(UPLOADS_IN_FLIGHT, queue.length) }, async () => {
      while (queue.length) await upload(queue.shift());
    });
    await Promise.all(workers);
    refresh();
  }

  // --- picking and dropping ----------------------------------------------------------------

  const input = $("file-input");
  input.addEventListener("change", () => {
    handleFiles(input.files);
    input.value = "";
  });
  const zone = $("dropzone");
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.remove("over"); });
  }
  zone.addEventListener("drop", (e) => handleFiles(e.dataTransfer.files));
  // A photo dropped beside the zone should not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());

  // --- the live panel -----------------------------------------------------------------------

  function kv(dl, entries) {
    dl.replaceChildren();
    for (const [k, v, cls] of entries) {
      dl.append(el("dt", null, k), el("dd", cls || null, String(v)));
    }
  }

  function renderSession() {
    const rows = [
      ["photos", session.photos],
      ["classified", session.done],
      ["from cache", session.cached],
    ];
    for (const [k, n] of Object.entries(session.sources)) rows.push([`source: ${k}`, n]);
    if (session.failed) rows.push(["failed", session.failed, "bad"]);
    kv($("session"), rows);
  }

  function renderHealth(status, body) {
    const pill = $("health-pill");
    const ready = !!(body && body.ready);
    pill.textContent = ready ? "ready" : status ? "not ready" : "unreachable";
    pill.className = "pill " + (ready ? "pill-ok" : "pill-bad");
    const rows = [["status", ready ? "ready" : `not ready (${status || "no answer"})`, ready ? "ok" : "bad"]];
    const checks = (body && body.checks) || {};
    for (const [name, value] of Object.entries(checks)) {
      if (value !== null && typeof value === "object") {
        for (const [k, v] of Object.entries(value)) rows.push([`${name}: ${k}`, v, stateClass(v)]);
      } else {
        rows.push([name.replace(/_/g, " "), value, stateClass(value, name)]);
      }
    }
    kv($("health"), rows);
  }

  function stateClass(value, name) {
    if (value === true) return name === "draining" ? "bad" : "ok";
    if (value === false) return name === "draining" ? "ok" : "bad";
    const v = String(value);
    if (/^(ok|closed)$/.test(v)) return "ok";
    if (/open|unreach|fail|down/.test(v)) return "bad";
    return null;
  }

  const pct = (x) => (typeof x === "number" ? (x * 100).toFixed(1) + "%" : "–");

  function renderStats(status, body) {
    const box = $("stats");
    box.replaceChildren();
    if (status === 404) {
      box.append(el("p", "muted", "Not available from this service."));
      return;
    }
    if (status === 401 || status === 403) {
      box.append(el("p", "muted", "Needs an admin API key."));
      return;
    }
    if (!body || status !== 200) {
      box.append(el("p", "muted", `No statistics (${status || "no answer"}).`));
      return;
    }
    const rows = [];
    if ("cache_hit_rate" in body) rows.push(["cache hit rate", pct(body.cache_hit_rate)]);
    const totals = body.totals || {};
    if ("requests" in totals) rows.push(["requests", totals.requests]);
    if ("cached_images" in totals) rows.push(["photos known", totals.cached_images]);
    if (body.today && "requests" in body.today) rows.push(["requests today", body.today.requests]);
    if ("llm_calls_saved" in body) rows.push(["LLM calls saved", body.llm_calls_saved]);
    const dl = el("dl", "kv");
    kv(dl, rows);
    box.append(dl);

    const service = body.service || {};
    const queues = service.queues || {};
    if (Object.keys(queues).length) {
      box.append(el("p", "subhead", "Queues"));
      for (const [name, q] of Object.entries(queues)) {
        const row = el("div", "queue");
        const bar = el("span", "queue-bar");
        const fill = el("span", "queue-fill");
        const depth = Number(q.depth) || 0;
        const cap = Number(q.capacity) || 0;
        fill.style.width = (cap ? Math.min(100, (100 * depth) / cap) : 0) + "%";
        bar.append(fill);
        row.append(el("span", null, name), bar, el("span", "muted", cap ? `${depth}/${cap}` : String(depth)));
        box.append(row);
      }
    }
    const breakers = service.breakers || {};
    if (Object.keys(breakers).length) {
      box.append(el("p", "subhead", "LLM breakers"));
      const b = el("dl", "kv");
      kv(b, Object.entries(breakers).map(([k, v]) => [k, v, stateClass(v)]));
      box.append(b);
    }
    const sources = body.sources || {};
    if (Object.keys(sources).length) {
      box.append(el("p", "subhead", "Sources"));
      const s = el("dl", "kv");
      kv(s, Object.entries(sources));
      box.append(s);
    }
  }

  async function getJson(path) {
    try {
      const response = await fetch(path, { headers: headers(), cache: "no-store" });
      let body = null;
      try { body = await response.json(); } catch (_) { body = null; }
      return [response.status, body];
    } catch (_) {
      return [0, null];
    }
  }

  let polling = null;
  async function refresh() {
    const [[hs, hb], [ss, sb]] = await Promise.all([getJson("/readyz"), getJson("/api/v1/stats")]);
    renderHealth(hs, hb);
    renderStats(ss, sb);
    $("updated").textContent = new Date().toLocaleTimeString();
  }

  function schedule() {
    clearInterval(polling);
    if (!document.hidden) polling = setInterval(refresh, POLL_MS);
  }
  document.addEventListener("visibilitychange", () => {
    schedule();
    if (!document.hidden) refresh();
  });

  renderSession();
  refresh();
  schedule();
})();
