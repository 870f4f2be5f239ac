// The operator console's only script: new transactions appear in the traffic table as
// they are recorded (from /admin/api/events). Every value is set with textContent, never
// parsed as HTML. Without JavaScript the page works the same, reloaded by hand.
"use strict";
(function () {
  const table = document.querySelector("table[data-live]");
  if (!table || !window.EventSource) return;
  const body = table.tBodies[0];
  const prefix = table.dataset.live.split("/api/")[0];
  const seen = new Set(Array.from(body.rows, (row) => row.dataset.seq));
  const when = (text) => (text ? text.replace("T", " ").slice(0, 19) : "");
  const cell = (row, text) => { row.insertCell().textContent = text == null ? "" : String(text); };
  const source = new EventSource(table.dataset.live);
  source.addEventListener("transaction", (event) => {
    const tx = JSON.parse(event.data);
    if (seen.has(String(tx.seq))) return;
    seen.add(String(tx.seq));
    const empty = body.querySelector("tr.empty");
    if (empty) empty.remove();
    const row = body.insertRow(0);
    row.dataset.seq = String(tx.seq);
    row.className = "fresh outcome-" + String(tx.outcome).replace(/[^a-z_]/g, "");
    const link = document.createElement("a");
    link.href = prefix + "/transactions/" + encodeURIComponent(tx.id);
    link.textContent = when(tx.received_at);
    row.insertCell().appendChild(link);
    cell(row, tx.client_key_name);
    cell(row, tx.method + " " + tx.endpoint);
    cell(row, tx.model);
    cell(row, tx.outcome);
    cell(row, tx.status);
    cell(row, tx.duration_ms == null ? "" : tx.duration_ms.toFixed(1) + " ms");
    cell(row, tx.total_tokens);
    while (body.rows.length > 200) body.deleteRow(body.rows.length - 1);
  });
})();
