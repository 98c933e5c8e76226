// The admin console's one script (the CSP allows no other): the audit page's live tail.
// Every 2 s it asks /admin/ui/audit/tail for the events since the newest it has and puts them on top
// of the table. Rows are built with DOM methods and textContent only: no event's data is ever parsed as HTML.
"use strict";

(function () {
  const table = document.getElementById("trail");
  if (!table || !table.dataset.tail) {
    return;
  }
  const body = table.tBodies[0];
  const status = document.getElementById("tail-status");
  const columns = ["time", "result", "user", "client", "operation", "target", "reason", "status", "approval_id"];
  const monospace = new Set(["time", "operation", "target", "approval_id"]);
  const results = new Set(["allowed", "denied", "auth_failed", "invalid_request", "upstream_error", "error"]);
  const seen = new Set(Array.from(body.rows, (row) => row.dataset.id).filter(Boolean));
  let after = table.dataset.after;

  function say(text) {
    if (status) {
      status.textContent = text;
    }
  }

  function row(event) {
    const tr = document.createElement("tr");
    tr.dataset.id = event.id;
    tr.className = "fresh";
    for (const column of columns) {
      const td = document.createElement("td");
      const value = event[column] === null || event[column] === undefined ? "" : String(event[column]);
      if (column === "result") {
        const badge = document.createElement("span");
        badge.className = "result " + (results.has(value) ? value : "other");
        badge.textContent = value;
        td.appendChild(badge);
      } else {
        td.textContent = value;
        if (monospace.has(column)) {
          td.className = "mono";
        } else if (column === "reason") {
          td.className = "reason";
        }
      }
      tr.appendChild(td);
    }
    return tr;
  }

  async function poll() {
    const url = new URL(table.dataset.tail, window.location.href);
    url.searchParams.set("after", after);
    let answer;
    try {
      answer = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    } catch (error) {
      say("Live tail: the gateway did not answer; trying again.");
      return true;
    }
    if (!answer.ok) {
      say(answer.status === 401 ? "Live tail stopped: signed out." : "Live tail stopped (HTTP " + answer.status + ").");
      return false;
    }
    const data = await answer.json();
    for (const event of data.events) {
      if (seen.has(event.id)) {
        continue;
      }
      seen.add(event.id);
      const empty = body.querySelector("tr.empty");
      if (empty) {
        empty.remove();
      }
      body.insertBefore(row(event), body.firstChild);
    }
    after = data.after || after;
    say("Newest first. Live: checked at " + new Date().toISOString().slice(11, 19) + " UTC.");
    return true;
  }

  async function loop() {
    if (await poll()) {
      window.setTimeout(loop, 2000);
    }
  }

  window.setTimeout(loop, 2000);
})();
