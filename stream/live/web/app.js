// Control-room page: a tile per stream with its redacted video (WHEP) and its status.
// No build step and no external resources: the page must work on an offline control-room PC.
"use strict";

const grid = document.getElementById("grid");
const message = document.getElementById("message");
const conn = document.getElementById("conn");
const tokenInput = document.getElementById("token");
const tiles = new Map();   // stream id -> {el, pc, resource, last}
let token = takeHashToken() || sessionStorage.getItem("stream-redact-token") || "";

// A token handed over as #token=... is read once, kept for this tab only, and removed from the
// address bar and history, so it is not left on screen, in a screenshot or in a shared link.
function takeHashToken() {
  const params = new URLSearchParams(location.hash.slice(1));
  const given = params.get("token");
  if (given === null) return "";
  params.delete("token");
  const rest = params.toString();
  history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  if (given) sessionStorage.setItem("stream-redact-token", given);
  return given;
}
let timer = null;

function headers(extra = {}) {
  return { Authorization: `Bearer ${token}`, ...extra };
}

function say(text) { message.textContent = text || ""; }

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (r.status === 401 || r.status === 403) {
    const body = await r.json().catch(() => ({}));
    throw new Error(`not authorised: ${body.error || r.status}`);
  }
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.status === 204 ? null : r.json();
}

function waitIce(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") { pc.removeEventListener("icegatheringstatechange", done); resolve(); } };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 2000);  // loopback and LAN gather in milliseconds; do not wait for dead STUN
  });
}

async function play(id, tile) {
  const pc = new RTCPeerConnection({ iceServers: [] });
  tile.pc = pc;
  pc.addTransceiver("video", { direction: "recvonly" });
  // the redacted audio too (speech muted unless the stream's audio policy says otherwise); the
  // server answers it inactive for a stream without audio, and the video plays either way
  pc.addTransceiver("audio", { direction: "recvonly" });
  const video = tile.el.querySelector("video");
  const media = new MediaStream();  // one element plays both tracks, whatever streams they came in
  pc.ontrack = (e) => {
    media.addTrack(e.track);
    if (video.srcObject !== media) video.srcObject = media;
  };
  pc.onconnectionstatechange = () => {
    if (["failed", "closed"].includes(pc.connectionState) && tiles.get(id) === tile) {
      stop(tile);
      setTimeout(() => tiles.get(id) === tile && play(id, tile).catch((e) => tileError(tile, e)), 2000);
    }
  };
  await pc.setLocalDescription(await pc.createOffer());
  await waitIce(pc);
  const r = await fetch(`/whep/${encodeURIComponent(id)}`, {
    method: "POST", headers: headers({ "Content-Type": "application/sdp" }), body: pc.localDescription.sdp,
  });
  if (r.status !== 201) {
    const text = await r.text();
    throw new Error(`WHEP ${r.status}: ${text.slice(0, 200)}`);
  }
  tile.resource = r.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: await r.text() });
}

function stop(tile) {
  if (tile.pc) { tile.pc.close(); tile.pc = null; }
  if (tile.resource) {
    fetch(tile.resource, { method: "DELETE", headers: headers() }).catch(() => {});
    tile.resource = null;
  }
}

function tileError(tile, e) {
  tile.el.querySelector(".events").replaceChildren(Object.assign(document.createElement("li"), { textContent: String(e.message || e) }));
}

function makeTile(s) {
  const el = document.getElementById("tile").content.firstElementChild.cloneNode(true);
  el.dataset.stream = s.id;
  el.querySelector(".name").textContent = s.id;
  grid.appendChild(el);
  const tile = { el, pc: null, resource: null, last: null, editor: null };
  tiles.set(s.id, tile);
  el.querySelector(".zones-btn").addEventListener("click", () => openZones(s.id, tile));
  const title = el.querySelector(".title");
  title.insertBefore(soundButton(el.querySelector("video")), title.querySelector(".zones-btn"));
  play(s.id, tile).catch((e) => tileError(tile, e));
  return tile;
}

// Videos start muted (browsers only autoplay muted media); the operator turns a tile's sound on.
function soundButton(video) {
  const b = Object.assign(document.createElement("button"), { type: "button", className: "sound-btn" });
  Object.assign(b.style, { fontSize: ".75rem", padding: ".1rem .45rem" });
  const show = () => {
    b.textContent = video.muted ? "Sound off" : "Sound on";
    b.setAttribute("aria-pressed", String(!video.muted));
    b.title = video.muted ? "play this stream's redacted audio" : "mute this stream";
  };
  b.addEventListener("click", () => {
    video.muted = !video.muted;
    if (!video.muted) video.play().catch(() => {});
    show();
  });
  show();
  return b;
}

function fmt(n, digits = 0) { return Number.isFinite(n) ? n.toFixed(digits) : "–"; }

function update(s) {
  const tile = tiles.get(s.id) || makeTile(s);
  const now = performance.now();
  const badge = tile.el.querySelector(".state");
  badge.textContent = s.state;
  badge.className = `badge state ${s.state}`;
  if (tile.last) {
    const dt = (now - tile.last.at) / 1000;
    tile.el.querySelector(".fps").textContent = fmt((s.published - tile.last.published) / dt, 1);
  }
  tile.last = { at: now, published: s.published };
  tile.el.querySelector(".latency").textContent = s.latency_ms == null ? "–" : `${fmt(s.latency_ms)} ms`;
  tile.el.querySelector(".dropped").textContent = s.dropped;
  tile.el.querySelector(".blanked").textContent = s.blanked;
  const list = tile.el.querySelector(".events");
  const items = (s.recent || []).slice().reverse().map((d) => {
    const li = document.createElement("li");
    const t = new Date(d.time * 1000).toLocaleTimeString();
    li.textContent = `${t} ${d.label} #${d.track_id} (${fmt(d.score * 100)}%)`;
    return li;
  });
  if (s.error) items.unshift(Object.assign(document.createElement("li"), { textContent: s.error }));
  list.replaceChildren(...items);
}

// -- privacy-zone editor ------------------------------------------------------------------------
// Zones are polygons in fractions of the picture (0..1). The overlay is laid exactly over the part
// of the <video> element the picture fills (object-fit: contain letterboxes it), so a click maps
// to the same point of the camera's picture whatever the tile's size.
function contentRect(video) {
  const w = video.clientWidth, h = video.clientHeight;
  const vw = video.videoWidth || 16, vh = video.videoHeight || 9;
  const scale = Math.min(w / vw, h / vh);
  const cw = vw * scale, ch = vh * scale;
  return { left: video.offsetLeft + (w - cw) / 2, top: video.offsetTop + (h - ch) / 2, width: cw, height: ch };
}

function placeLayer(tile) {
  const layer = tile.el.querySelector(".zone-layer");
  const r = contentRect(tile.el.querySelector("video"));
  Object.assign(layer.style, { left: `${r.left}px`, top: `${r.top}px`, width: `${r.width}px`, height: `${r.height}px` });
}

function drawZones(tile) {
  const ed = tile.editor, layer = tile.el.querySelector(".zone-layer");
  const SVG = layer.namespaceURI;  // the overlay's own namespace: no address written in the page
  const shapes = ed.zones.map((z) => {
    const p = document.createElementNS(SVG, "polygon");
    p.setAttribute("points", z.points.map((q) => q.join(",")).join(" "));
    p.setAttribute("class", z.kind);
    return p;
  });
  if (ed.current.length) {
    const p = document.createElementNS(SVG, ed.current.length > 2 ? "polygon" : "polyline");
    p.setAttribute("points", ed.current.map((q) => q.join(",")).join(" "));
    p.setAttribute("class", "drawing");
    shapes.push(p);
  }
  layer.replaceChildren(...shapes);
  placeLayer(tile);
}

function zoneStatus(tile, text) { tile.el.querySelector(".zone-status").textContent = text || ""; }

function closeZones(tile) {
  tile.editor = null;
  tile.el.querySelector(".zone-layer").style.display = "none";
  tile.el.querySelector(".zone-tools").hidden = true;
}

async function openZones(id, tile) {
  if (tile.editor) { closeZones(tile); return; }
  const tools = tile.el.querySelector(".zone-tools"), layer = tile.el.querySelector(".zone-layer");
  let zones;
  try {
    ({ zones } = await api(`/api/streams/${encodeURIComponent(id)}/zones`));
  } catch (e) { tileError(tile, e); return; }
  tile.editor = { id, zones: zones.map((z) => ({ kind: z.kind, points: z.points, name: z.name || "" })), current: [] };
  tools.hidden = false;
  layer.style.display = "block";
  zoneStatus(tile, zones.length ? `${zones.length} zone(s) saved` : "no zones yet");
  drawZones(tile);
}

function finishShape(tile) {
  const ed = tile.editor;
  if (!ed) return;
  if (ed.current.length < 3) { zoneStatus(tile, "a zone needs at least 3 corners"); return; }
  ed.zones.push({ kind: tile.el.querySelector(".zone-kind").value, points: ed.current, name: "" });
  ed.current = [];
  zoneStatus(tile, "shape added; Save to apply it");
  drawZones(tile);
}

async function saveZones(tile) {
  const ed = tile.editor;
  if (!ed) return;
  if (ed.current.length >= 3) finishShape(tile);
  const r = await fetch(`/api/streams/${encodeURIComponent(ed.id)}/zones`, {
    method: "PUT", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify({ zones: ed.zones }),
  });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) { zoneStatus(tile, `not saved: ${body.error || r.status}`); return; }
  ed.zones = body.zones;
  zoneStatus(tile, `saved: ${body.zones.length} zone(s) painted on the stream`);
  drawZones(tile);
}

function round4(x) { return Math.round(Math.min(1, Math.max(0, x)) * 10000) / 10000; }

grid.addEventListener("click", (e) => {
  const el = e.target.closest(".tile");
  const tile = el && tiles.get(el.dataset.stream);
  if (!tile || !tile.editor) return;
  const layer = e.target.closest(".zone-layer");
  if (layer) {
    const r = layer.getBoundingClientRect();
    tile.editor.current.push([round4((e.clientX - r.left) / r.width), round4((e.clientY - r.top) / r.height)]);
    drawZones(tile);
  } else if (e.target.matches(".zone-finish")) finishShape(tile);
  else if (e.target.matches(".zone-undo")) {
    if (tile.editor.current.length) tile.editor.current.pop(); else tile.editor.zones.pop();
    drawZones(tile);
  } else if (e.target.matches(".zone-clear")) { tile.editor.zones = []; tile.editor.current = []; drawZones(tile); }
  else if (e.target.matches(".zone-save")) saveZones(tile).catch((err) => zoneStatus(tile, String(err.message || err)));
  else if (e.target.matches(".zone-cancel")) closeZones(tile);
});
window.addEventListener("resize", () => tiles.forEach((t) => t.editor && placeLayer(t)));

async function refresh() {
  try {
    const { streams } = await api("/api/streams");
    conn.textContent = "connected"; conn.className = "pill ok"; say("");
    const ids = new Set(streams.map((s) => s.id));
    for (const [id, tile] of tiles) if (!ids.has(id)) { stop(tile); tile.el.remove(); tiles.delete(id); }
    streams.forEach(update);
    if (!streams.length) say("No streams yet: add one with POST /api/streams or in the config file.");
  } catch (e) {
    conn.textContent = "not connected"; conn.className = "pill bad"; say(e.message);
  }
}

function connect() {
  for (const tile of tiles.values()) { stop(tile); tile.el.remove(); }
  tiles.clear();
  clearInterval(timer);
  refresh();
  timer = setInterval(refresh, 2000);
}

document.getElementById("login").addEventListener("submit", (e) => {
  e.preventDefault();
  token = tokenInput.value.trim();
  sessionStorage.setItem("stream-redact-token", token);
  connect();
});
window.addEventListener("beforeunload", () => tiles.forEach(stop));
tokenInput.value = token;
connect();
