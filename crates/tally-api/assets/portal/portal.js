// Tally's customer portal: plain JavaScript against the HTTP API, no build step.
//
// Sign-in: a portal key with its customer, from the form or from the URL's fragment
// (`#customer=C&key=K`, or `#customer=C&token=K` from a portal link); kept in
// sessionStorage for this tab only. The fragment never reaches the server.
// `#request=feature:NAME` (or `plan:NAME`) with `&message=…` in the fragment fills and
// sends the request form once signed in (a link can prefill a request).
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#3056d3", "#d3862f", "#2f9e6b", "#a03bc4", "#c43b5a", "#3ba7c4"];
let session = null;

function readFragment() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const key = params.get("key") || params.get("token");
  const customer = params.get("customer");
  const request = params.get("request");
  const message = params.get("message") || "";
  if (key || request) {
    // Leave no key in the address bar or the history.
    history.replaceState(null, "", location.pathname);
  }
  return { key, customer, request, message };
}

async function api(method, path, body) {
  const headers = { authorization: "Bearer " + session.key, accept: "application/json" };
  const init = { method, headers };
  if (body !== undefined) {
    headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const detail = data && data.detail ? data.detail : response.statusText;
    const error = new Error(detail);
    error.status = response.status;
    error.field = data && data.field;
    throw error;
  }
  return data;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}

function fmt(n) {
  return Number.isInteger(n) ? String(n) : n.toFixed(2);
}

function showError(e) {
  const p = $("error");
  p.hidden = false;
  p.textContent = String(e.message || e);
}

function customerPath(rest) {
  return "/api/v1/customers/" + encodeURIComponent(session.customer) + rest;
}

function renderBars(entitlements) {
  const bars = $("bars");
  const resets = $("resets");
  const names = $("feature-names");
  bars.replaceChildren();
  resets.replaceChildren();
  names.replaceChildren();
  const seen = new Map();
  for (const [feature, v] of Object.entries(entitlements.features)) {
    names.append(el("option", { value: feature }));
    const row = el("div", {
      class: "feature",
      "data-feature": feature,
      "data-usage": String(v.usage),
      "data-limit": v.limit === undefined ? "" : String(v.limit),
      "data-access": String(v.hasAccess),
    });
    let label;
    if (v.config !== undefined) {
      label = v.config;
    } else if (v.limit !== undefined) {
      label = fmt(v.usage) + " of " + fmt(v.limit);
    } else if (v.usage > 0) {
      label = fmt(v.usage) + " (unlimited)";
    } else {
      label = v.hasAccess ? "included" : "not included";
    }
    row.append(el("div", { class: "name" }, el("span", {}, feature), el("span", { class: "value" }, label)));
    if (v.limit !== undefined) {
      const track = el("div", { class: "track" });
      const fill = el("div", { class: v.usage > v.limit ? "fill over" : "fill" });
      const pct = v.limit > 0 ? Math.min(100, (100 * v.usage) / v.limit) : 100;
      fill.style.width = pct.toFixed(1) + "%";
      track.append(fill);
      row.append(track);
    }
    bars.append(row);
    if (v.resetsAt) {
      const at = v.resetsAt;
      if (!seen.has(at)) seen.set(at, []);
      seen.get(at).push(feature);
    }
  }
  for (const [at, features] of [...seen.entries()].sort()) {
    resets.append(el("li", { class: "reset", "data-at": at }, new Date(at).toUTCString() + ": " + features.join(", ")));
  }
  if (seen.size === 0) resets.append(el("li", {}, "no metered feature resets"));
}

function renderChart(rows, from, to) {
  const chart = $("chart");
  chart.replaceChildren();
  const days = [];
  for (let d = new Date(from + "T00:00:00Z"); d <= new Date(to + "T00:00:00Z"); d.setUTCDate(d.getUTCDate() + 1)) {
    days.push(d.toISOString().slice(0, 10));
  }
  const features = [...new Set(rows.map((r) => r.feature))].sort();
  if (features.length === 0) {
    chart.append(el("p", { class: "empty" }, "no usage recorded yet this period"));
    return;
  }
  const values = new Map(rows.map((r) => [r.day + "|" + r.feature, Number(r.quantity)]));
  const max = Math.max(1, ...rows.map((r) => Number(r.quantity)));
  const W = 720, H = 220, L = 40, B = 24, T = 8;
  const step = (W - L - 8) / Math.max(1, days.length);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("width", W);
  svg.setAttribute("height", H);
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
    return n;
  };
  add("line", { x1: L, y1: H - B, x2: W - 4, y2: H - B, stroke: "#999" });
  add("text", { x: 2, y: T + 10, "font-size": 10 }, fmt(max));
  add("text", { x: 2, y: H - B, "font-size": 10 }, "0");
  const bw = Math.max(1, (step - 2) / features.length);
  days.forEach((day, i) => {
    features.forEach((f, j) => {
      const q = values.get(day + "|" + f) || 0;
      if (q <= 0) return;
      const h = ((H - B - T) * q) / max;
      const rect = add("rect", {
        x: L + i * step + j * bw, y: H - B - h, width: bw, height: h,
        fill: COLORS[j % COLORS.length], "data-day": day, "data-feature": f, "data-quantity": q,
      });
      const title = document.createElementNS(ns, "title");
      title.textContent = `${day} ${f}: ${fmt(q)}`;
      rect.append(title);
    });
    if (i % Math.ceil(days.length / 8) === 0) {
      add("text", { x: L + i * step, y: H - 8, "font-size": 10 }, day.slice(5));
    }
  });
  chart.append(svg);
  const legend = el("div", { class: "legend" });
  features.forEach((f, j) => {
    const swatch = el("span", {}, "■ ");
    swatch.style.color = COLORS[j % COLORS.length];
    legend.append(swatch, f + "  ");
  });
  chart.append(legend);
}

function renderRequests(list) {
  const ul = $("requests");
  ul.replaceChildren();
  if (list.requests.length === 0) ul.append(el("li", {}, "none yet"));
  for (const r of list.requests.slice().reverse()) {
    const what = r.plan ? "upgrade to plan " + r.plan : "feature " + r.feature;
    const li = el("li", { class: "request", "data-id": r.id, "data-status": r.status },
      el("span", { class: "status " + r.status }, r.status), " ", what,
      " — ", new Date(r.created_at).toUTCString());
    if (r.reason) li.append(el("span", { class: "reason" }, " (" + r.reason + ")"));
    ul.append(li);
  }
}

async function refresh() {
  const [entitlements, license, requests] = await Promise.all([
    api("GET", customerPath("/entitlements")),
    api("POST", customerPath("/license"), {}),
    api("GET", customerPath("/access-requests")),
  ]);
  // Today as the server counts it (the license was issued just now): a customer's computer
  // with a wrong clock still sees this month's chart.
  const today = new Date(license.license.issued_at).toISOString().slice(0, 10);
  const from = today.slice(0, 8) + "01";
  $("plan").textContent = license.license.plan;
  $("plan").setAttribute("data-plan", license.license.plan);
  const blob = new Blob([license.token + "\n"], { type: "text/plain" });
  const link = $("license-download");
  link.href = URL.createObjectURL(blob);
  link.download = session.customer + ".license";
  $("license-expiry").textContent = "valid until " + new Date(license.license.expires_at).toUTCString();
  renderBars(entitlements);
  renderRequests(requests);
  try {
    const rows = await api("GET", customerPath("/usage?from=" + from + "&to=" + today));
    renderChart(rows, from, today);
  } catch (e) {
    $("chart").replaceChildren(el("p", { class: "empty" }, "daily usage unavailable: " + e.message));
  }
}

async function sendRequest(kind, target, message) {
  const body = { message };
  body[kind] = target;
  const result = $("request-result");
  try {
    const created = await api("POST", customerPath("/access-requests"), body);
    result.textContent = "Request " + created.id + " sent: " + created.status;
    result.setAttribute("data-id", created.id);
    renderRequests(await api("GET", customerPath("/access-requests")));
  } catch (e) {
    result.textContent = "Not sent: " + e.message;
  }
}

async function signIn(customer, key, pending) {
  session = { customer, key };
  try {
    await refresh();
  } catch (e) {
    session = null;
    sessionStorage.removeItem("tally.portal");
    document.body.setAttribute("data-state", "error");
    showError(e.status === 401 ? "This key or link is not valid (any more): " + e.message : e);
    return;
  }
  sessionStorage.setItem("tally.portal", JSON.stringify(session));
  $("signin").hidden = true;
  $("account").hidden = false;
  $("who").textContent = customer;
  if (pending) {
    const [kind, target] = pending.request.split(/:(.*)/s);
    $("request-kind").value = kind;
    $("request-target").value = target;
    $("request-message").value = pending.message;
    await sendRequest(kind, target, pending.message);
  }
  document.body.setAttribute("data-state", "ready");
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn($("signin-customer").value.trim(), $("signin-key").value.trim(), null);
  });
  $("request-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sendRequest($("request-kind").value, $("request-target").value.trim(), $("request-message").value);
  });
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem("tally.portal");
    location.reload();
  });
  const fragment = readFragment();
  const stored = JSON.parse(sessionStorage.getItem("tally.portal") || "null");
  const pending = fragment.request ? fragment : null;
  if (fragment.key && fragment.customer) {
    signIn(fragment.customer, fragment.key, pending);
  } else if (stored) {
    signIn(stored.customer, stored.key, pending);
  }
});
