// The timerd console: plain JavaScript, no build step, no library.
//
// It talks to the same HTTP API as any client (`stats`, `timers`, ...), relative to this page,
// so it works behind a load balancer or under a path prefix. With keys in force the API key is
// kept in this tab's sessionStorage only and sent as `Authorization: Bearer` on every call.
// Every value that comes from the API is put into the page as text (`el` below appends text
// nodes); nothing is ever parsed as HTML.
"use strict";

(() => {
  const KEY = "timerd.apiKey";
  const POLL_MS = 2000;
  const STATES = ["pending", "firing", "fired", "failed", "cancelled", "paused"];
  const $ = (id) => document.getElementById(id);
  let generation = 0; // bumped on every navigation: stale polls and answers see it and stop

  // DOM: elements with attributes and text children; no markup is ever parsed.

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const timerLink = (id) => el("a", { href: "#/timers/" + encodeURIComponent(id), class: "id" }, id);
  const badge = (state) => el("span", { class: "badge state-" + state }, state);
  const orDash = (value) => (value === null || value === undefined || value === "" ? "—" : value);

  function seconds(ms) {
    const s = Math.abs(ms) / 1000;
    if (s < 60) return s.toFixed(1) + " s";
    if (s < 3600) return (s / 60).toFixed(1) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  // The API: relative URLs, the key from this tab, errors as ApiError with the API's message.

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
    toString() {
      return this.status ? `${this.status} ${this.code}: ${this.message}` : this.message;
    }
  }

  async function api(method, path, body) {
    const headers = { accept: "application/json" };
    const key = sessionStorage.getItem(KEY);
    if (key) headers.authorization = "Bearer " + key;
    if (body !== undefined) headers["content-type"] = "application/json";
    const asked = generation;
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        credentials: "omit",
        cache: "no-store",
        redirect: "error",
      });
    } catch (err) {
      throw new ApiError(0, "network", "The API cannot be reached: " + err.message);
    }
    const data = await response.json().catch(() => null);
    if (response.status === 401) {
      if (asked === generation) signIn(key ? "The API refused this key." : "This timerd needs an API key.");
      throw new ApiError(401, "unauthorized", "a valid API key is required");
    }
    if (!response.ok) {
      const error = (data && data.error) || {};
      throw new ApiError(response.status, error.code || "http_error", error.message || response.statusText);
    }
    return data;
  }

  // Signing in and out.

  function signIn(reason) {
    generation += 1;
    sessionStorage.removeItem(KEY);
    $("view").replaceChildren();
    $("sign-out").hidden = true;
    notice(null);
    $("sign-in-reason").textContent = reason;
    $("sign-in").hidden = false;
    $("api-key").value = "";
    $("api-key").focus();
  }

  $("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    $("api-key").value = "";
    $("sign-in").hidden = true;
    route();
  });

  $("sign-out").addEventListener("click", () => signIn("Signed out."));

  function notice(error) {
    $("notice").hidden = !error;
    $("notice").textContent = error ? String(error) : "";
  }

  const report = (err) => {
    if (err.status !== 401) notice(err); // a 401 has brought up the sign-in form already
  };

  // Keep calling `work` every POLL_MS while this view is shown (and the tab is visible).

  function poll(work) {
    const mine = generation;
    const tick = async () => {
      if (mine !== generation) return;
      if (!document.hidden) {
        try {
          await work();
          if (mine === generation) notice(null);
        } catch (err) {
          if (mine === generation && err.status !== 401) notice(err);
        }
      }
      if (mine === generation) setTimeout(tick, POLL_MS);
    };
    return tick();
  }

  // Overview: counts, backlog, recent deliveries and who fires, refreshed live.

  function overview(view) {
    const body = el("div", { class: "cards", id: "overview" });
    const updated = el("p", { class: "hint", id: "updated" });
    view.append(el("h1", {}, "Overview"), body, updated);
    return poll(async () => {
      const stats = await api("GET", "stats");
      body.replaceChildren(
        countsCard(stats.counts, stats.counts_limit),
        backlogCard(stats.backlog),
        recentCard(stats.recent),
        firingCard(stats.firing),
      );
      updated.textContent = "Updated " + stats.now + ", every 2 s.";
    });
  }

  function card(title, ...rows) {
    return el("section", { class: "card" }, el("h2", {}, title), ...rows);
  }

  function figure(label, value, attrs) {
    return el("div", { class: "figure", ...attrs }, el("span", { class: "value" }, value), el("span", { class: "label" }, label));
  }

  function countsCard(counts, limit) {
    const figures = STATES.map((state) =>
      el("a", { href: "#/timers?state=" + state, class: "figure state-" + state, "data-count": state },
        el("span", { class: "value" }, counts[state] >= limit ? `${limit}+` : counts[state]),
        el("span", { class: "label" }, state)));
    return card("Timers by state", el("div", { class: "figures" }, figures));
  }

  function backlogCard(backlog) {
    const next = backlog.next;
    let line = "Nothing is pending.";
    if (next) {
      line = next.overdue_ms > 0
        ? el("span", {}, "Oldest overdue: ", timerLink(next.id), `, due ${seconds(next.overdue_ms)} ago`)
        : el("span", {}, "Next due: ", timerLink(next.id), " at " + next.fire_at);
    }
    return card("Backlog",
      el("div", { class: "figures" }, figure("pending", backlog.pending, { "data-figure": "pending" })),
      el("p", { "data-figure": "next" }, line));
  }

  function recentCard(recent) {
    const late = recent.lateness_ms;
    return card(`Last ${recent.window_s / 60} minutes`,
      el("div", { class: "figures" },
        figure("fired", recent.fired, { "data-figure": "fired" }),
        figure("fired / s (last min)", recent.fired_per_s, { "data-figure": "rate" }),
        figure("dead letters", recent.failed, { "data-figure": "failed" }),
        figure("failed attempts", recent.failed_attempts, { "data-figure": "failed-attempts" })),
      el("p", { "data-figure": "lateness" }, late
        ? `Lateness: p50 ${late.p50} ms · p99 ${late.p99} ms · max ${late.max} ms`
        : "Lateness: no timer delivered in this window."),
      el("p", { class: "hint" }, `From the newest ${recent.sample} fired and failed timers.`));
  }

  function firingCard(firing) {
    const summary = `${firing.held} of ${firing.partitions} partitions held by ` +
      `${firing.daemons.length} daemon${firing.daemons.length === 1 ? "" : "s"}`;
    return card("Who fires",
      el("p", { "data-figure": "firing" }, summary),
      el("ul", {}, ...firing.daemons.map((d) =>
        el("li", {}, el("code", {}, d.holder), ` holds ${d.partitions}`))),
      firing.held < firing.partitions
        ? el("p", { class: "warn" }, "Some partitions have no live holder: their timers wait.")
        : null);
  }

  // Timers: filters, newest first, paged with the API's cursor.

  function listing(view, params) {
    const state = params.get("state") || "";
    const prefix = params.get("url_prefix") || "";
    const cursor = params.get("cursor") || "";
    const query = new URLSearchParams({ limit: "50" });
    if (state) query.set("state", state);
    if (prefix) query.set("url_prefix", prefix);
    if (cursor) query.set("cursor", cursor);

    const stateField = el("select", { id: "filter-state", name: "state" },
      el("option", { value: "" }, "any state"),
      STATES.map((s) => el("option", { value: s, selected: s === state }, s === "failed" ? "failed (dead letters)" : s)));
    const prefixField = el("input", { id: "filter-url", name: "url_prefix", type: "text", value: prefix,
      placeholder: "https://host.example/path", size: 36 });
    const filters = el("form", { class: "filters", id: "filters", onsubmit: (event) => {
      event.preventDefault();
      const next = new URLSearchParams();
      if (stateField.value) next.set("state", stateField.value);
      if (prefixField.value.trim()) next.set("url_prefix", prefixField.value.trim());
      location.hash = "#/timers" + (next.toString() ? "?" + next : "");
    } },
      el("label", {}, "State ", stateField),
      el("label", {}, "URL starts with ", prefixField),
      el("button", { type: "submit" }, "Filter"));
    const idField = el("input", { id: "find-id", type: "text", placeholder: "24 hex digits", size: 26, spellcheck: "false" });
    const finder = el("form", { class: "filters", id: "find", onsubmit: (event) => {
      event.preventDefault();
      if (idField.value.trim()) location.hash = "#/timers/" + encodeURIComponent(idField.value.trim());
    } }, el("label", {}, "Timer id ", idField), el("button", { type: "submit" }, "Open"));

    const table = el("div", { id: "timer-list" });
    const pager = el("p", { class: "pager" });
    view.append(el("h1", {}, state === "failed" ? "Dead letters" : "Timers"), filters, finder, table, pager);

    const load = async () => {
      const page = await api("GET", "timers?" + query);
      table.replaceChildren(timerTable(page.timers, prefix));
      const links = [];
      if (cursor) {
        const newest = new URLSearchParams(params);
        newest.delete("cursor");
        links.push(el("a", { href: "#/timers?" + newest }, "← Newest"));
      }
      if (page.next_cursor) {
        const older = new URLSearchParams(params);
        older.set("cursor", page.next_cursor);
        links.push(el("a", { href: "#/timers?" + older, id: "older" }, "Older →"));
      }
      pager.replaceChildren(...links);
    };
    return cursor ? load().catch(report) : poll(load); // the first page stays live
  }

  function timerTable(timers, prefix) {
    if (!timers.length) {
      return el("p", { class: "empty" }, prefix
        ? "No timer with this URL prefix among those looked at; “Older →” looks further."
        : "No timers.");
    }
    return el("table", { class: "timers" },
      el("thead", {}, el("tr", {}, ["ID", "State", "URL", "Fire at", "Attempts", "Last outcome"].map((h) => el("th", {}, h)))),
      el("tbody", {}, timers.map((t) => el("tr", { "data-id": t.id },
        el("td", {}, timerLink(t.id)),
        el("td", {}, badge(t.state)),
        el("td", { class: "url" }, t.url),
        el("td", {}, t.fire_at),
        el("td", { class: "num" }, t.attempts),
        el("td", {}, orDash(t.last_status !== null ? t.last_status : t.last_error))))));
  }

  // One timer: every field, payload, headers, attempt history; cancel, replay, move.

  function detail(view, id) {
    const holder = el("div", { id: "timer" });
    view.append(holder);
    const mine = generation;
    const show = async () => {
      const timer = await api("GET", "timers/" + encodeURIComponent(id));
      if (mine !== generation) return;
      holder.replaceChildren(...timerDetail(timer, show));
      const cb = timer.callback;
      const calling = cb && (cb.state === "firing" || (cb.state === "pending" && Date.parse(cb.next_attempt_at) - Date.now() <= 5000));
      const busy = calling || timer.state === "firing" || (timer.state === "pending" && timer.time_left <= 5);
      if (busy) setTimeout(() => mine === generation && show().catch(report), POLL_MS);
    };
    return show().catch((err) => {
      if (mine === generation && err.status !== 401) holder.replaceChildren(el("p", { class: "error", id: "load-error" }, String(err)));
    });
  }

  function timerDetail(t, reload) {
    const failure = el("p", { class: "error", id: "action-error", role: "alert", hidden: true });
    const act = (method, path, body) => async () => {
      failure.hidden = true;
      try {
        await api(method, path, body);
        await reload();
      } catch (err) {
        if (err.status === 401) return;
        failure.textContent = String(err);
        failure.hidden = false;
      }
    };
    const path = "timers/" + encodeURIComponent(t.id);
    const buttons = [];
    if (t.state === "pending") buttons.push(el("button", { id: "cancel", type: "button", class: "danger", onclick: act("DELETE", path) }, "Cancel"));
    if (t.state === "failed" || t.state === "fired") buttons.push(el("button", { id: "replay", type: "button", onclick: act("POST", path + "/replay") }, "Replay"));
    if (t.recurring && t.state === "pending") buttons.push(el("button", { id: "pause", type: "button", onclick: act("POST", path + "/pause") }, "Pause series"));
    if (t.recurring && t.state === "paused") buttons.push(el("button", { id: "resume", type: "button", onclick: act("POST", path + "/resume") }, "Resume series"));

    const fields = [
      ["State", badge(t.state)], ["URL", t.url], ["Fire at", t.fire_at], ["Time left", t.time_left + " s"],
      ["Next attempt", orDash(t.next_attempt_at)], ["Attempts", t.attempts], ["Max attempts", orDash(t.max_attempts)],
      ["Created", t.created_at], ["Fired", orDash(t.fired_at)], ["Last status", orDash(t.last_status)],
      ["Last error", orDash(t.last_error)], ["On failure", orDash(t.on_failure_url)],
      ["Callback", orDash(callbackText(t.callback))],
    ];
    if (t.recurring) {
      fields.push(["Schedule", scheduleText(t.schedule)], ["Occurrence", t.occurrence],
        ["Occurrences ended", `${t.occurrences} (${t.occurrences_failed} failed)`],
        ["Next fire", orDash(t.next_fire_at)]);
    }
    const headers = Object.entries(t.headers);
    return [
      el("h1", {}, "Timer ", el("code", { id: "timer-id" }, t.id)),
      el("div", { class: "actions" }, buttons, t.state === "pending" ? moveForm(t, act) : null),
      failure,
      el("dl", { class: "fields" }, fields.map(([name, value]) => [el("dt", {}, name), el("dd", { "data-field": name }, value)])),
      el("h2", {}, "Payload"),
      el("pre", { id: "payload" }, t.payload === null ? "none" : JSON.stringify(t.payload, null, 2)),
      el("h2", {}, "Headers"),
      headers.length
        ? el("table", { id: "headers" }, el("tbody", {}, headers.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)))))
        : el("p", { class: "empty" }, "none"),
      ...(t.recurring ? [el("h2", {}, "Upcoming"), upcoming(t.upcoming)] : []),
      el("h2", {}, "Attempts"),
      history(t.history),
    ];
  }

  // A series' schedule as the create body wrote it, in one line.
  function scheduleText(schedule) {
    const what = schedule.every ? `every ${schedule.every} from ${schedule.start_at}` : `cron "${schedule.cron}" in ${schedule.timezone}`;
    const ends = [schedule.until ? `until ${schedule.until}` : null,
      schedule.max_occurrences ? `at most ${schedule.max_occurrences} times` : null].filter(Boolean);
    return [what, ...ends, `catch up: ${schedule.catch_up}`].join(", ");
  }

  function upcoming(times) {
    if (!times.length) return el("p", { class: "empty", id: "upcoming" }, "none");
    return el("ol", { id: "upcoming" }, times.map((at) => el("li", {}, at)));
  }

  // The failure callback of the latest failure, in one line; null before any.
  function callbackText(cb) {
    if (!cb) return null;
    const last = cb.last_status !== null ? "last " + cb.last_status : cb.last_error ? "last " + cb.last_error : "";
    const next = cb.next_attempt_at ? "next " + cb.next_attempt_at : "";
    return [cb.state, cb.attempts + " attempt" + (cb.attempts === 1 ? "" : "s"), last, next].filter(Boolean).join(", ");
  }

  function moveForm(t, act) {
    const when = el("input", { id: "move-to", type: "text", size: 28, placeholder: "seconds from now, or 2030-01-01T12:00:00Z" });
    return el("form", { id: "move", class: "inline", onsubmit: (event) => {
      event.preventDefault();
      const value = when.value.trim();
      const body = /^[0-9]+(\.[0-9]+)?$/.test(value) ? { seconds: Number(value) } : { fire_at: value };
      act("PATCH", "timers/" + encodeURIComponent(t.id), body)();
    } }, el("label", {}, "Move to ", when), el("button", { type: "submit" }, "Change due time"));
  }

  function history(records) {
    if (!records.length) return el("p", { class: "empty" }, "No attempt yet.");
    return el("table", { id: "history" },
      el("thead", {}, el("tr", {}, ["#", "At", "Status", "Error", "Latency", "Answer (start)"].map((h) => el("th", {}, h)))),
      el("tbody", {}, records.slice().reverse().map((r) => el("tr", {},
        el("td", { class: "num" }, r.attempt), el("td", {}, r.at), el("td", {}, orDash(r.status)),
        el("td", {}, orDash(r.error)), el("td", { class: "num" }, r.latency_ms.toFixed(1) + " ms"),
        el("td", {}, el("pre", { class: "answer" }, orDash(r.response)))))));
  }

  // A new timer, created through POST /timers with the API's own validation.

  function create(view) {
    const failure = el("p", { class: "error", id: "create-error", role: "alert", hidden: true });
    const field = (label, input) => el("label", {}, el("span", {}, label), input);
    const url = el("input", { id: "new-url", type: "text", required: true, size: 50, placeholder: "https://example.com/hooks" });
    const when = el("input", { id: "new-when", type: "text", value: "60", size: 28 });
    const payload = el("textarea", { id: "new-payload", rows: 4, placeholder: '{"order": 42}' });
    const headers = el("textarea", { id: "new-headers", rows: 2, placeholder: '{"x-token": "…"}' });
    const attempts = el("input", { id: "new-attempts", type: "number", min: 1, max: 100 });
    const form = el("form", { id: "new", class: "card form", onsubmit: async (event) => {
      event.preventDefault();
      failure.hidden = true;
      try {
        const value = when.value.trim();
        const body = /^[0-9]+(\.[0-9]+)?$/.test(value) ? { seconds: Number(value) } : { fire_at: value };
        body.url = url.value.trim();
        if (payload.value.trim()) body.payload = parseJson("payload", payload.value);
        if (headers.value.trim()) body.headers = parseJson("headers", headers.value);
        if (attempts.value) body.max_attempts = Number(attempts.value);
        const timer = await api("POST", "timers", body);
        location.hash = "#/timers/" + encodeURIComponent(timer.id);
      } catch (err) {
        if (err.status === 401) return;
        failure.textContent = String(err);
        failure.hidden = false;
      }
    } },
      field("URL", url),
      field("When (seconds from now, or an RFC 3339 time)", when),
      field("Payload (JSON, optional)", payload),
      field("Headers (JSON object, optional)", headers),
      field("Max attempts (optional)", attempts),
      el("button", { type: "submit" }, "Create timer"), failure);
    // Ask the API first, so that a key it wants is asked for before the form is filled in.
    return api("GET", "timers?limit=1")
      .then(() => view.append(el("h1", {}, "New timer"), form))
      .catch(report);
  }

  function parseJson(name, text) {
    try {
      return JSON.parse(text);
    } catch (err) {
      throw new ApiError(0, "invalid_json", `${name} is not JSON: ${err.message}`);
    }
  }

  // Routing on the fragment: #/, #/timers?..., #/timers/<id>, #/new. The key is never in it.

  function route() {
    generation += 1;
    $("sign-in").hidden = true;
    $("sign-out").hidden = !sessionStorage.getItem(KEY);
    notice(null);
    const view = $("view");
    view.replaceChildren();
    const [path, search] = (location.hash.slice(1) || "/").split("?");
    const params = new URLSearchParams(search || "");
    let section = "overview";
    if (path === "/timers") section = params.get("state") === "failed" ? "dead" : "timers";
    else if (path.startsWith("/timers/")) section = "timers";
    else if (path === "/new") section = "new";
    for (const link of document.querySelectorAll("[data-nav]")) {
      link.classList.toggle("current", link.dataset.nav === section);
    }
    if (path === "/timers") return listing(view, params);
    if (path.startsWith("/timers/")) return detail(view, decodeURIComponent(path.slice(8)));
    if (path === "/new") return create(view);
    return overview(view);
  }

  window.addEventListener("hashchange", route);
  route();
})();
