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
  const video = tile.el.querySelector("video");
  pc.ontrack = (e) => { video.srcObject = e.streams[0] || new MediaStream([e.track]); };
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
  const tile = { el, pc: null, resource: null, last: null };
  tiles.set(s.id, tile);
  play(s.id, tile).catch((e) => tileError(tile, e));
  return tile;
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
