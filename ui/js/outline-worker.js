// The dashboard's outline worker: reads a trace's binary outline and lays the trace out off the
// page's thread, with the dashboard's own wasm (`outline_layout` in ui/src/outline_worker.rs), and
// sends back flat typed arrays, moved rather than copied. Started by the trace page; one message
// in (the outline's bytes), one message out ({ ...arrays } or { error }).
import init, { outline_layout } from "./ui.js";

const ready = init();

self.onmessage = async (event) => {
  try {
    await ready;
    const out = outline_layout(new Uint8Array(event.data));
    const buffers = Object.values(out).filter((v) => ArrayBuffer.isView(v)).map((v) => v.buffer);
    self.postMessage(out, buffers);
  } catch (e) {
    self.postMessage({ error: String((e && e.message) || e) });
  }
};
