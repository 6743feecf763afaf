// worker_core operations console: live updates without a page reload.
// No framework and no build step. Served from the dashboard itself ('self' in the
// Content-Security-Policy); it never inserts HTML strings: text goes in through
// textContent, rows are built with createElement, refreshed pages are parsed
// with DOMParser and their nodes adopted.
"use strict";

(function () {
  var STATUSES = ["queued", "running", "succeeded", "dead", "cancelled"];
  var FIELDS = ["ready", "scheduled", "oldest_ready_seconds", "p50_seconds", "p95_seconds",
    "succeeded_1h", "failed_1h", "workers"];
  var DURATIONS = { oldest_ready_seconds: true, p50_seconds: true, p95_seconds: true };

  function seconds(value) {
    if (value === null || value === undefined) return "—";
    if (value < 1) return Math.round(value * 1000) + " ms";
    if (value < 60) return value.toFixed(1) + " s";
    var m = Math.floor(value / 60), s = Math.floor(value % 60);
    if (m < 60) return m + " min " + s + " s";
    var hours = Math.floor(m / 60);
    if (hours < 48) return hours + " h " + (m % 60) + " min";
    return Math.floor(hours / 24) + " d " + (hours % 24) + " h";
  }

  function setState(text) {
    var el = document.getElementById("live-state");
    if (el) el.textContent = text;
  }

  function sel(attr, value) {
    return "[" + attr + '="' + CSS.escape(String(value)) + '"]';
  }

  function cell(tag, text, attrs) {
    var el = document.createElement(tag);
    el.textContent = text;
    for (var key in attrs) el.setAttribute(key, attrs[key]);
    return el;
  }

  function newRow(q) {
    var tr = document.createElement("tr");
    tr.setAttribute("data-row", q.queue);
    var th = document.createElement("th");
    th.setAttribute("scope", "row");
    var a = cell("a", q.queue, { href: "/jobs?queue=" + encodeURIComponent(q.queue) });
    var badge = cell("span", " paused", { "class": "badge", "data-queue": q.queue,
      "data-field": "paused" });
    th.appendChild(a);
    th.appendChild(badge);
    tr.appendChild(th);
    STATUSES.forEach(function (s) {
      tr.appendChild(cell("td", "0", { "data-queue": q.queue, "data-status": s, "class": "num" }));
    });
    FIELDS.forEach(function (f) {
      tr.appendChild(cell("td", "", { "data-queue": q.queue, "data-field": f, "class": "num" }));
    });
    return tr;
  }

  function applyOverview(data) {
    var body = document.getElementById("overview-rows");
    if (!body) return;
    var total = body.querySelector("tr.total");
    var seen = {};
    data.queues.forEach(function (q) {
      seen[q.queue] = true;
      var row = body.querySelector("tr" + sel("data-row", q.queue));
      if (!row) {
        row = newRow(q);
        body.insertBefore(row, total);
      }
      STATUSES.forEach(function (s) {
        var el = row.querySelector(sel("data-status", s));
        if (el) el.textContent = String(q.counts[s]);
      });
      FIELDS.forEach(function (f) {
        var el = row.querySelector(sel("data-field", f));
        if (el) el.textContent = DURATIONS[f] ? seconds(q[f]) : String(q[f]);
      });
      var badge = row.querySelector(sel("data-field", "paused"));
      if (badge) badge.hidden = !q.paused;
    });
    Array.prototype.forEach.call(body.querySelectorAll("tr[data-row]"), function (row) {
      if (!seen[row.getAttribute("data-row")]) row.remove();
    });
    STATUSES.forEach(function (s) {
      var el = body.querySelector(sel("data-queue", "*") + sel("data-status", s));
      if (el) el.textContent = String(data.totals[s]);
    });
    ["workers_alive", "workers_gone"].forEach(function (f) {
      var el = document.querySelector("p " + sel("data-field", f));
      if (el) el.textContent = String(data[f]);
    });
    var stamp = document.querySelector("time" + sel("data-field", "generated_at"));
    if (stamp) {
      stamp.textContent = String(data.generated_at).slice(11, 19) + " UTC";
      stamp.setAttribute("datetime", data.generated_at);
    }
    document.body.setAttribute("data-updated", data.generated_at);
  }

  function poll(url, every, apply) {
    function tick() {
      fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
        .then(function (d) { apply(d); setState("live (polling)"); })
        .catch(function () { setState("reconnecting…"); })
        .then(function () { setTimeout(tick, every); });
    }
    tick();
  }

  function liveOverview() {
    if (!window.EventSource) {
      poll("/api/overview", 2000, applyOverview);
      return;
    }
    var failures = 0;
    var source = new EventSource("/api/events");
    source.addEventListener("overview", function (event) {
      failures = 0;
      setState("live");
      applyOverview(JSON.parse(event.data));
    });
    source.onerror = function () {
      failures += 1;
      setState("reconnecting…");
      if (failures > 5) {  // a proxy that buffers event streams: fall back to polling
        source.close();
        poll("/api/overview", 2000, applyOverview);
      }
    };
    setInterval(function () {
      Array.prototype.forEach.call(document.querySelectorAll("img[data-chart]"), function (img) {
        var url = new URL(img.getAttribute("src"), location.href);
        url.searchParams.set("t", String(Date.now()));
        img.setAttribute("src", url.pathname + url.search);
      });
    }, 30000);
  }

  function busy() {
    var active = document.activeElement;
    if (active && /^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(active.tagName)) return true;
    return document.querySelector("main input[type=checkbox]:checked") !== null;
  }

  function liveRefresh(every) {
    setInterval(function () {
      if (document.hidden || busy()) return;
      fetch(location.href, { credentials: "same-origin" })
        .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
        .then(function (text) {
          var doc = new DOMParser().parseFromString(text, "text/html");
          var fresh = doc.getElementById("main");
          var main = document.getElementById("main");
          if (!fresh || !main || busy()) return;
          main.replaceChildren.apply(main, Array.prototype.map.call(fresh.childNodes,
            function (node) { return document.adoptNode(node); }));
          setState("live");
        })
        .catch(function () { setState("reconnecting…"); });
    }, every);
  }

  function selectAll() {
    Array.prototype.forEach.call(document.querySelectorAll("input[data-select-all]"),
      function (box) {
        box.addEventListener("change", function () {
          var name = box.getAttribute("data-select-all");
          var form = box.form || document;
          Array.prototype.forEach.call(form.querySelectorAll("input" + sel("name", name)),
            function (other) { other.checked = box.checked; });
        });
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var live = document.body.getAttribute("data-live");
    if (live === "overview") liveOverview();
    else if (live === "refresh") liveRefresh(5000);
    selectAll();
  });
})();
