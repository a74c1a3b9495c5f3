// The harness's side of a benchmark's Node process: one JSON command per
// stdin line in, one JSON event per stdout line out.
"use strict";

const readline = require("readline");

function out(event) {
  process.stdout.write(JSON.stringify(event) + "\n");
}

// handlers: {cmd: (command) => void}. After "close"'s handler the process
// answers {"event": "closed"} and exits; it exits too when stdin closes.
function serve(handlers) {
  const input = readline.createInterface({ input: process.stdin });
  input.on("line", (line) => {
    if (!line.trim()) return;
    const command = JSON.parse(line);
    if (!Object.hasOwn(handlers, command.cmd)) {
      out({ event: "error", message: `unknown command ${command.cmd}` });
      return;
    }
    handlers[command.cmd](command);
    if (command.cmd === "close") {
      out({ event: "closed" });
      setTimeout(() => process.exit(0), 10);
    }
  });
  input.on("close", () => process.exit(0));
}

module.exports = { out, serve };
