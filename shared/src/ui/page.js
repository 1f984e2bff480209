// radflow's web page: fetches overview.json every two seconds and redraws the tables.
// Everything received is written as text (textContent), never as markup.
"use strict";

(() => {
  const REFRESH_MS = 2000;
  /** Oldest unfinished work above this is shown as lag. */
  const LAG_MS = 60000;
  const $ = (id) => document.getElementById(id);
  /** Preview images by URL, kept across redraws so that each is fetched once. */
  const previews = new Map();

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function age(ms) {
    if (ms === null || ms === undefined) return "–";
    if (ms < 1000) return `${ms} ms`;
    if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
    if (ms < 3600000) return `${Math.floor(ms / 60000)} min ${Math.floor((ms % 60000) / 1000)} s`;
    return `${Math.floor(ms / 3600000)} h ${Math.floor((ms % 3600000) / 60000)} min`;
  }

  function ago(now, at) {
    const td = el("td", "nowrap", `${age(Math.max(0, now - at))} ago`);
    td.title = new Date(at).toLocaleString();
    return td;
  }

  function fill(id, rows, row) {
    $(id).tBodies[0].replaceChildren(...rows.map(row));
    $(`${id}-empty`).hidden = rows.length > 0;
  }

  function preview(url) {
    let img = previews.get(url);
    if (!img) {
      img = el("img", "preview");
      img.alt = "preview";
      img.addEventListener("load", () => {
        img.dataset.loaded = "true";
        img.dataset.naturalWidth = String(img.naturalWidth);
      });
      img.addEventListener("error", () => { img.dataset.loaded = "false"; });
      img.src = url;
      previews.set(url, img);
    }
    return img;
  }

  function draw(v) {
    const now = v.generated_at_ms;
    $("bus").textContent = `bus: ${v.bus}`;
    fill("queues", v.queues, (q) => {
      const tr = el("tr", "queue");
      tr.dataset.consumer = q.consumer;
      tr.append(el("td", null, q.stream), el("td", null, q.consumer),
        el("td", `lane-${q.lane}`, q.lane), el("td", "n", q.waiting),
        el("td", "n", q.in_flight), el("td", "n", q.redelivered),
        el("td", q.oldest_ms > LAG_MS ? "n lag" : "n", age(q.oldest_ms)));
      return tr;
    });
    fill("assembling", v.assembling, (a) => {
      const tr = el("tr", "assembling");
      tr.dataset.series = a.series_uid;
      const count = a.expected ? `${a.instances} / ${a.expected}` : a.instances;
      tr.append(el("td", "uid", a.series_uid), el("td", null, a.modality || "–"),
        el("td", "n", a.revision), el("td", "n", count), el("td", "n", age(a.quiet_for_ms)));
      return tr;
    });
    fill("results", v.results, (r) => {
      const tr = el("tr", "result");
      tr.dataset.series = r.series_uid;
      tr.dataset.model = `${r.model}@${r.model_version}`;
      const img = el("td");
      img.append(preview(r.preview));
      const model = el("td", "nowrap", `${r.model}@${r.model_version}`);
      if (r.shadow) model.append(" ", el("span", "shadow", "shadow"));
      const volumes = el("ul", "volumes");
      for (const l of r.labels) volumes.append(el("li", "label", `${l.name}: ${l.volume_ml.toFixed(1)} mL`));
      for (const c of r.classes) {
        const mark = c.positive === true ? " ✔" : "";
        volumes.append(el("li", "class", `${c.name}: ${c.score.toFixed(3)}${mark}`));
      }
      const series = el("td", "uid", r.series_uid);
      if (r.revision > 1) series.append(el("span", "muted", ` rev ${r.revision}`));
      const vol = el("td");
      vol.append(volumes);
      const took = r.took_ms === null || r.took_ms === undefined ? "–" : age(Math.round(r.took_ms));
      tr.append(img, series, el("td", null, r.modality || "–"), model, vol,
        el("td", null, r.provider), el("td", "n nowrap", took), ago(now, r.at_ms));
      return tr;
    });
    fill("dead-letters", v.dead_letters, (d) => {
      const tr = el("tr", "dead-letter");
      tr.dataset.seq = String(d.seq);
      tr.append(el("td", "n", d.seq), el("td", null, d.stage), el("td", null, d.code),
        el("td", null, d.reason), el("td", "uid", d.series_uid || "–"),
        el("td", "n", d.attempts), ago(now, d.at_ms));
      return tr;
    });
    const live = $("live");
    live.classList.remove("stale");
    live.textContent = `updated ${new Date(now).toLocaleTimeString()}`;
    document.body.dataset.updated = String(now);
  }

  let timer = null;
  function schedule(ms) {
    clearTimeout(timer);
    timer = setTimeout(refresh, ms);
  }

  async function refresh() {
    // A page in a background tab asks nothing; it catches up when shown again.
    if (document.hidden) return;
    try {
      const r = await fetch("overview.json", { cache: "no-store" });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      draw(await r.json());
    } catch (e) {
      const live = $("live");
      live.classList.add("stale");
      live.textContent = `not answering (${e.message})`;
    } finally {
      schedule(REFRESH_MS);
    }
  }

  document.addEventListener("visibilitychange", () => { if (!document.hidden) schedule(0); });
  refresh();
})();
