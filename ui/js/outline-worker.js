// The dashboard's outline worker: reads a trace's binary outline and lays the trace out off the
// page's thread, with the dashboard's own wasm (`outline_layout` in ui/src/outline_worker.rs), and
// sends back flat typed arrays, moved rather than copied. Started by the trace page, which sends
// two messages: the wasm module it already compiled ({ module }), then the outline's bytes; one
// message comes back ({ ...arrays } or { error }).
import init, { outline_layout } from "./ui.js";

let ready = null;

self.onmessage = async (event) => {
  if (event.data && event.data.module) {
    ready = init({ module_or_path: event.data.module });
    return;
  }
  try {
    await (ready || (ready = init()));
    const out = outline_layout(new Uint8Array(event.data));
    const buffers = Object.values(out).filter((v) => ArrayBuffer.isView(v)).map((v) => v.buffer);
    self.postMessage(out, buffers);
  } catch (e) {
    self.postMessage({ error: String((e && e.message) || e) });
  }
};
