// The page: the bundle's end-to-end model on onnxruntime-web (WebAssembly), fed from the
// microphone or a recording, through the same detection as `kws stream`.
// URL options: ?threads=N (onnxruntime-web threads, when the page is cross-origin isolated),
// ?resample=page (resample in the page even where the browser could).
import * as ort from "./ort/ort.wasm.min.mjs";
import { Resampler, StreamDetector } from "./detector.js";

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

// What the page has done, for people reading the console and for the browser tests.
const state = { ready: false, error: null, mode: "idle", events: [], hopMs: [], samplesFed: 0, threads: 1,
  resampledInPage: false, fileDone: false };
window.kws = state;

let config, detector, live = null;

async function main() {
  config = await (await fetch("config.json")).json();
  const d = config.detector;
  $("settings").textContent = `hop ${d.hop_ms} ms, averaging ${d.average_ms} ms, threshold ${d.threshold}, ` +
    `at least ${d.min_count} results, suppression ${d.suppression_ms} ms`;
  ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.max(1, Number(params.get("threads") || 1)) : 1;
  state.threads = ort.env.wasm.numThreads;
  const session = await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
  const score = async (window) => {
    const start = performance.now();
    const input = new ort.Tensor("float32", window.slice(), [1, window.length]);
    const output = await session.run({ [config.input_name]: input });
    state.hopMs.push(performance.now() - start);
    return output[config.output_name].data;
  };
  detector = new StreamDetector(config, score);
  detector.onScores = (timeMs, probabilities) => drawBars(probabilities);
  buildBars();
  $("about").textContent = `${config.bundle}: ${config.artifact} (${config.precision}), ${config.labels.length} classes, ` +
    `${config.sample_rate} Hz, onnxruntime-web ${ort.env.versions.web}, ${state.threads} thread(s).`;
  $("start").onclick = () => startListening().catch(fail);
  $("stop").onclick = () => stopListening().catch(fail);
  $("file").onchange = (e) => e.target.files[0] && runFile(e.target.files[0]).catch(fail);
  $("start").disabled = $("file").disabled = false;
  state.ready = true;
}

// ---------------------------------------------------------------------------------- microphone

async function startListening() {
  say(null);
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    say("This page cannot use a microphone here: browsers allow it only on localhost or over HTTPS. " +
      `Open it at http://localhost:${location.port || 80}/ on this machine, or choose a recording below.`);
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch (error) {
    say(microphoneProblem(error));
    return;
  }
  const { context, source, resampler } = await openContext(stream);
  await context.audioWorklet.addModule("capture-worklet.js");
  const capture = new AudioWorkletNode(context, "capture");
  const mute = new GainNode(context, { gain: 0 }); // pulled by the destination, so it runs; silent
  source.connect(capture).connect(mute).connect(context.destination);
  detector.reset();
  clearEvents();
  const current = { stream, context, capture, queue: Promise.resolve() };
  capture.port.onmessage = (message) => {
    const chunk = resampler ? resampler.process(message.data) : message.data;
    state.samplesFed += chunk.length;
    // hops are scored one after the other, never two at once
    current.queue = current.queue.then(() => detector.feed(chunk)).then(showEvents).catch(fail);
  };
  live = current;
  state.mode = "listening";
  $("start").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = `listening (audio at ${context.sampleRate} Hz` +
    (resampler ? `, resampled in the page to ${config.sample_rate} Hz)` : ")");
}

// An audio context at the model's rate lets the browser resample; where it cannot, the page does.
async function openContext(stream) {
  if (params.get("resample") !== "page") {
    let context = null;
    try {
      context = new AudioContext({ sampleRate: config.sample_rate });
      const source = context.createMediaStreamSource(stream);
      state.resampledInPage = false;
      return { context, source, resampler: null };
    } catch (error) {
      if (context) context.close();
      console.info(`no audio context at ${config.sample_rate} Hz (${error.message}); resampling in the page`);
    }
  }
  const context = new AudioContext();
  state.resampledInPage = context.sampleRate !== config.sample_rate;
  const resampler = state.resampledInPage ? new Resampler(context.sampleRate, config.sample_rate) : null;
  return { context, source: context.createMediaStreamSource(stream), resampler };
}

function microphoneProblem(error) {
  const alternative = " Or choose a recording below.";
  switch (error.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Microphone access was refused. Allow it in the browser's site settings and press Listen again." + alternative;
    case "NotFoundError":
    case "OverconstrainedError":
      return "No microphone was found. Connect one and press Listen again." + alternative;
    case "NotReadableError":
      return "The microphone could not be opened: another program may be using it." + alternative;
    default:
      return `The microphone could not be opened (${error.name}: ${error.message}).` + alternative;
  }
}

// Stops the capture and waits for the hops already queued, so nothing else feeds the detector meanwhile.
async function stopListening() {
  if (!live) return;
  const { stream, context, capture, queue } = live;
  live = null;
  capture.port.onmessage = null;
  stream.getTracks().forEach((track) => track.stop());
  await context.close();
  await queue;
  state.mode = "idle";
  $("start").disabled = false;
  $("stop").disabled = true;
  $("status").textContent = "stopped";
}

// ----------------------------------------------------------------------------------- recording

async function runFile(file) {
  say(null);
  await stopListening();
  let audio;
  try {
    // decoding in a context at the model's rate resamples as it decodes
    audio = await new OfflineAudioContext(1, 1, config.sample_rate).decodeAudioData(await file.arrayBuffer());
  } catch (error) {
    say(`${file.name}: the browser cannot decode it as audio (${error.message || error.name}). WAV files always work.`);
    return;
  }
  const samples = mixDown(audio);
  state.mode = "file";
  state.fileDone = false;
  detector.reset();
  clearEvents();
  const second = config.sample_rate;
  for (let start = 0; start < samples.length; start += second) {
    showEvents(await detector.feed(samples.subarray(start, start + second)));
    $("status").textContent = `${file.name}: ${(start / second).toFixed(0)} of ${(samples.length / second).toFixed(1)} s`;
  }
  showEvents(await detector.flush());
  state.samplesFed += samples.length;
  $("status").textContent = `${file.name}: ${(samples.length / second).toFixed(1)} s, ${state.events.length} keyword(s), ` +
    `${hopSummary()}`;
  state.mode = "idle";
  state.fileDone = true;
}

function mixDown(audio) {
  if (audio.numberOfChannels === 1) return audio.getChannelData(0);
  const mono = new Float32Array(audio.length);
  for (let c = 0; c < audio.numberOfChannels; c++) {
    const channel = audio.getChannelData(c);
    for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / audio.numberOfChannels;
  }
  return mono;
}

// ------------------------------------------------------------------------------------- display

function showEvents(events) {
  for (const event of events) {
    state.events.push(event);
    const row = $("events").tBodies[0].insertRow(0);
    for (const text of [event.time.toFixed(2), event.label, event.score.toFixed(2)]) row.insertCell().textContent = text;
  }
  if (state.mode === "listening" && state.hopMs.length % 10 === 0) $("status").textContent = `listening; ${hopSummary()}`;
}

function clearEvents() {
  state.events = [];
  state.hopMs = [];
  $("events").tBodies[0].replaceChildren();
}

function hopSummary() {
  const sorted = [...state.hopMs].sort((a, b) => a - b);
  const median = sorted.length ? sorted[Math.floor(sorted.length / 2)] : NaN;
  return `model run per hop: median ${median.toFixed(2)} ms over ${sorted.length} hops`;
}

function buildBars() {
  $("bars").replaceChildren(...config.labels.map((label) => {
    const bar = document.createElement("div");
    bar.className = config.quiet_labels.includes(label) ? "bar quiet" : "bar";
    bar.innerHTML = '<span class="label"></span><div class="track"><div class="fill"></div></div><span class="value"></span>';
    bar.querySelector(".label").textContent = label;
    return bar;
  }));
}

function drawBars(probabilities) {
  $("bars").querySelectorAll(".bar").forEach((bar, i) => {
    bar.querySelector(".fill").style.width = `${(100 * probabilities[i]).toFixed(1)}%`;
    bar.querySelector(".value").textContent = probabilities[i].toFixed(2);
  });
}

function say(text) {
  $("message").hidden = !text;
  $("message").textContent = text || "";
}

function fail(error) {
  state.error = String(error && error.message ? error.message : error);
  say(`Something went wrong: ${state.error}`);
  console.error(error);
}

main().catch(fail);
