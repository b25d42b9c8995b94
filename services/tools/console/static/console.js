// The mesh console page: polls /api/mesh every second and redraws graph, tiles, members
// and errors in place. Every text from the mesh goes through textContent, never markup.
"use strict";

const POLL_MS = 1000;
const FETCH_TIMEOUT_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";
const NODE_W = 160;
const NODE_H = 30;
const NOT_OPEN = new Set(["closed", "none"]);

const drawn = { nodes: new Map(), edges: new Map(), labels: new Map(), tiles: new Map() };

function svg(tag, attrs) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) element.setAttribute(name, value);
  return element;
}

function html(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

function percent(value) {
  return `${value.toFixed(value >= 10 || value === 0 ? 0 : 1)}%`;
}

function plural(count, word) {
  return `${count} ${word}${count === 1 ? "" : "s"}`;
}

function clock(iso) {
  if (!iso) return "";
  const when = new Date(iso);
  return Number.isNaN(when.getTime()) ? iso : when.toLocaleTimeString();
}

function isActive(edge) {
  return edge.calls > 0 || !NOT_OPEN.has(edge.breaker);
}

function edgeText(edge) {
  const figures = `${edge.rate_per_s.toFixed(1)}/s · ${percent(edge.error_pct)} · p99 ${edge.p99_ms} ms`;
  return NOT_OPEN.has(edge.breaker) ? figures : `${edge.breaker.toUpperCase()} · ${figures}`;
}

// Where the line between two node boxes leaves the first one's border.
function border(from, to) {
  const dx = to.x - from.x;
  const dy = to.y - from.y;
  const scale = Math.min(
    dx === 0 ? Infinity : (NODE_W / 2 + 4) / Math.abs(dx),
    dy === 0 ? Infinity : (NODE_H / 2 + 4) / Math.abs(dy),
  );
  return { x: from.x + dx * scale, y: from.y + dy * scale };
}

function drawNodes(nodes) {
  const layer = document.getElementById("nodes");
  for (const node of nodes) {
    let group = drawn.nodes.get(node.id);
    if (!group) {
      group = svg("g", { class: "node", "data-node": node.id });
      group.append(
        svg("rect", { x: node.x - NODE_W / 2, y: node.y - NODE_H / 2, width: NODE_W, height: NODE_H }),
        svg("text", { x: node.x, y: node.y }),
        svg("title"),
      );
      group.querySelector("text").textContent = node.id;
      layer.append(group);
      drawn.nodes.set(node.id, group);
    }
    group.setAttribute("data-health", node.health);
    group.setAttribute("data-crash-looping", String(node.crash_looping));
    const restarts = node.restarts ? `, ${node.restarts} restarts` : "";
    const replicas = node.replicas || [];
    // Replicas: the count on the node, each one's health in its title.
    group.querySelector("text").textContent =
      replicas.length > 1 ? `${node.id} ×${replicas.length}` : node.id;
    const each = replicas.length > 1
      ? "; " + replicas.map((r) => `${r.name} ${r.address}: ${r.health}`).join("; ")
      : "";
    group.querySelector("title").textContent =
      `${node.id}: ${node.health}${restarts}${node.reason ? ` (${node.reason})` : ""}${each}`;
  }
}

function drawEdges(edges, nodes) {
  const at = new Map(nodes.map((n) => [n.id, n]));
  const ids = new Set(edges.map((e) => e.id));
  const edgeLayer = document.getElementById("edges");
  const labelLayer = document.getElementById("labels");
  for (const edge of edges) {
    const from = at.get(edge.caller);
    const to = at.get(edge.target);
    if (!from || !to) continue;
    let line = drawn.edges.get(edge.id);
    let label = drawn.labels.get(edge.id);
    if (!line) {
      // Calls both ways between two services: each line moves aside so both show.
      const both = ids.has(`${edge.target}->${edge.caller}`);
      const length = Math.hypot(to.x - from.x, to.y - from.y) || 1;
      const shift = both ? 6 : 0;
      const nx = (-(to.y - from.y) / length) * shift;
      const ny = ((to.x - from.x) / length) * shift;
      const start = border(from, to);
      const end = border(to, from);
      line = svg("line", {
        class: "edge",
        "data-edge": edge.id,
        x1: start.x + nx, y1: start.y + ny, x2: end.x + nx, y2: end.y + ny,
        "marker-end": "url(#arrow)",
      });
      line.append(svg("title"));
      edgeLayer.append(line);
      drawn.edges.set(edge.id, line);
      label = svg("text", {
        class: "edge-label",
        "data-edge-label": edge.id,
        x: (start.x + end.x) / 2 + nx * 2,
        y: (start.y + end.y) / 2 + ny * 2 - 3,
        "text-anchor": "middle",
      });
      labelLayer.append(label);
      drawn.labels.set(edge.id, label);
    }
    line.setAttribute("data-breaker", edge.breaker);
    line.setAttribute("data-active", String(isActive(edge)));
    line.querySelector("title").textContent = `${edge.id}: ${edgeText(edge)}`;
    label.setAttribute("data-breaker", edge.breaker);
    label.textContent = isActive(edge) ? edgeText(edge) : "";
  }
}

function figure(list, name, value) {
  list.append(html("span", "", name), html("span", "", value));
}

function fillTile(tile, edge) {
  tile.replaceChildren();
  tile.setAttribute("data-breaker", edge.breaker);
  tile.setAttribute("data-active", String(isActive(edge)));
  tile.append(html("h3", "", `${edge.caller} → ${edge.target}`));
  tile.append(html("div", "rate", edge.known ? `${edge.rate_per_s.toFixed(1)} calls/s` : "no report"));
  const list = html("div", "figures");
  figure(list, "errors", percent(edge.error_pct));
  figure(list, "p50 / p99", `${edge.p50_ms} / ${edge.p99_ms} ms`);
  figure(list, "retries", `${edge.retries_per_s.toFixed(1)}/s`);
  if (edge.budget) {
    const spent = `${edge.budget.retries}/${edge.budget.first_attempts}`;
    const refused = edge.budget.exhausted_total ? `, ${edge.budget.exhausted_total} refused` : "";
    figure(list, "budget", `${spent} retries/calls${refused}`);
  }
  const breaker = html("span");
  const state = html("span", "breaker", edge.breaker === "none" ? "no breaker" : edge.breaker);
  breaker.append(state);
  if (edge.breaker === "open" && edge.open_left_s !== null) {
    breaker.append(html("span", "left", ` ${edge.open_left_s.toFixed(1)} s left`));
  }
  list.append(html("span", "", "breaker"), breaker);
  tile.append(list);
}

function rank(edge) {
  if (!NOT_OPEN.has(edge.breaker)) return 0;
  return edge.calls > 0 ? 1 : 2;
}

function drawTiles(edges) {
  const container = document.getElementById("tiles");
  const ordered = [...edges].sort(
    (a, b) => rank(a) - rank(b) || b.rate_per_s - a.rate_per_s || a.id.localeCompare(b.id),
  );
  for (const edge of ordered) {
    let tile = drawn.tiles.get(edge.id);
    if (!tile) {
      tile = html("div", "tile");
      tile.setAttribute("data-tile", edge.id);
      drawn.tiles.set(edge.id, tile);
    }
    fillTile(tile, edge);
    container.append(tile); // moves it into its place in the order
  }
}

function drawMembers(members, nodes) {
  const body = document.querySelector("#members tbody");
  body.replaceChildren();
  const rows = members.length
    ? members
    : nodes.filter((n) => n.health !== "partner").map((n) => ({ name: n.id, health: n.health }));
  for (const member of rows) {
    const row = html("tr");
    row.setAttribute("data-member", member.name);
    row.setAttribute("data-crash-looping", String(Boolean(member.crash_looping)));
    let state = member.health || (member.running ? "running" : "waiting for restart");
    if (member.crash_looping) state = "CRASH-LOOPING";
    const exit = member.last_exit
      ? `${member.last_exit} ${new Date(member.last_exit_time * 1000).toLocaleTimeString()}`
      : "-";
    row.append(
      html("td", "", member.name),
      html("td", "", state),
      html("td", "", member.restarts === undefined ? "-" : String(member.restarts)),
      html("td", "", exit),
    );
    body.append(row);
  }
}

function drawErrors(errors) {
  const list = document.getElementById("errors");
  list.replaceChildren();
  if (!errors.length) list.append(html("li", "", "none"));
  for (const error of errors) {
    const item = html("li");
    item.setAttribute("data-error", error.where);
    item.append(
      html("span", "when", `${clock(error.time)} `),
      html("span", "where", `${error.where}: `),
      html("span", "", error.message),
    );
    list.append(item);
  }
}

function drawSummary(model) {
  const summary = model.summary;
  const line = document.getElementById("summary");
  line.setAttribute("data-state", model.stale ? "stale" : "ok");
  line.setAttribute("data-open-breakers", String(summary.open_breakers.length));
  const open = summary.open_breakers.length
    ? ` (${summary.open_breakers.join(", ")})`
    : "";
  const looping = summary.crash_looping.length
    ? ` (${summary.crash_looping.join(", ")})`
    : "";
  line.textContent =
    `${summary.serving}/${summary.services} serving, ` +
    `${plural(summary.open_breakers.length, "open breaker")}${open}, ` +
    `${summary.crash_looping.length} crash-looping${looping}`;
  const updated = document.getElementById("updated");
  updated.textContent = `updated ${new Date(model.time * 1000).toLocaleTimeString()}` +
    (model.stale ? " (the mesh is slow to answer)" : "") +
    (summary.launcher === "running" ? "" : ` · launcher: ${summary.launcher}`);
}

function draw(model) {
  document.getElementById("graph").setAttribute(
    "viewBox", `0 0 ${model.size.width} ${model.size.height}`,
  );
  drawNodes(model.nodes);
  drawEdges(model.edges, model.nodes);
  drawTiles(model.edges);
  drawMembers(model.members, model.nodes);
  drawErrors(model.errors);
  drawSummary(model);
  document.body.setAttribute("data-updated", String(model.time));
}

function showProblem(message) {
  const line = document.getElementById("summary");
  line.setAttribute("data-state", "error");
  line.textContent = message;
}

async function poll() {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
  try {
    const reply = await fetch("/api/mesh", { signal: abort.signal, cache: "no-store" });
    const body = await reply.json();
    if (!reply.ok) showProblem(body.error || `HTTP ${reply.status}`);
    else draw(body);
  } catch (error) {
    showProblem(`console unreachable: ${error.message || error}`);
  } finally {
    clearTimeout(timer);
    setTimeout(poll, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", poll);
