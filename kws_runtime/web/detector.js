// Keyword events from a stream of samples: kws_runtime/stream.py's Detector and Smoother, in
// the browser. The settings come from the server's config.json (kws_runtime.serve.page_config),
// so the page and `kws stream` fire on the same rules.

// Scores of successive windows in, events out (RecognizeCommands' semantics: averaging over
// average_ms, a threshold, a minimum count, a suppression time; quiet labels never fire).
export class Smoother {
  constructor(detector, labels, quietLabels) {
    this.config = detector;
    this.labels = labels;
    this.quiet = new Set(labels.flatMap((label, i) => (quietLabels.includes(label) ? [i] : [])));
    this.reset();
  }

  reset() {
    this.results = []; // [time ms, probabilities]
    this.lastEvent = null; // [label index, time ms]
    this.armed = true;
  }

  update(nowMs, probabilities) {
    const c = this.config;
    this.results.push([nowMs, probabilities]);
    while (this.results.length && this.results[0][0] <= nowMs - c.average_ms) this.results.shift();
    if (this.results.length < c.min_count) return null;
    const average = new Float64Array(this.labels.length);
    for (const [, p] of this.results) for (let i = 0; i < average.length; i++) average[i] += p[i];
    let top = 0;
    for (let i = 0; i < average.length; i++) {
      average[i] /= this.results.length;
      if (average[i] > average[top]) top = i;
    }
    const score = average[top];
    const last = this.lastEvent ? this.lastEvent[0] : null;
    if (top !== last || score < c.threshold) this.armed = true; // another word, or this one ended
    if (this.quiet.has(top) || score < c.threshold || !this.armed) return null;
    if (this.lastEvent && nowMs - this.lastEvent[1] < c.suppression_ms) return null;
    this.lastEvent = [top, nowMs];
    this.armed = false;
    return { label: this.labels[top], time: Math.round(nowMs) / 1000, score };
  }
}

// The latest window (clip_samples) scored every hop by `score(window) -> Promise<probabilities>`.
// feed() may be called with chunks of any size; hops are scored in order, one at a time.
export class StreamDetector {
  constructor(config, score) {
    this.config = config;
    this.score = score;
    this.rate = config.sample_rate;
    this.hop = Math.round((config.detector.hop_ms * this.rate) / 1000);
    this.smoother = new Smoother(config.detector, config.labels, config.quiet_labels);
    this.onScores = null; // (time ms, probabilities) of every window
    this.reset();
  }

  reset() {
    this.window = new Float32Array(this.config.clip_samples); // the stream starts from silence
    this.pending = new Float32Array(this.hop);
    this.pendingSamples = 0;
    this.position = 0; // samples scored so far: the end of the latest window
    this.smoother.reset();
  }

  // The events the chunk completes, oldest first.
  async feed(chunk) {
    const events = [];
    let start = 0;
    while (start < chunk.length) {
      const take = Math.min(chunk.length - start, this.hop - this.pendingSamples);
      this.pending.set(chunk.subarray(start, start + take), this.pendingSamples);
      this.pendingSamples += take;
      start += take;
      if (this.pendingSamples === this.hop) {
        const event = await this.advance(this.pending);
        if (event) events.push(event);
        this.pendingSamples = 0;
      }
    }
    return events;
  }

  // End of a stream: complete the hop in progress and half a window of silence, as
  // Detector.flush() does; then start over.
  async flush() {
    const tail = Math.floor(this.config.clip_samples / 2) + ((this.hop - this.pendingSamples) % this.hop);
    const events = await this.feed(new Float32Array(tail));
    this.reset();
    return events;
  }

  async advance(hopSamples) {
    this.window.copyWithin(0, this.hop);
    this.window.set(hopSamples, this.window.length - this.hop);
    this.position += this.hop;
    const probabilities = await this.score(this.window);
    const nowMs = (1000 * this.position) / this.rate;
    if (this.onScores) this.onScores(nowMs, probabilities);
    return this.smoother.update(nowMs, probabilities);
  }
}

// Streaming resampler for a microphone whose rate the page cannot choose: windowed-sinc
// interpolation (Hann window, `halfTaps` taps a side) with the cut-off at the lower Nyquist rate.
export class Resampler {
  constructor(fromRate, toRate, halfTaps = 16) {
    this.step = fromRate / toRate; // input samples per output sample
    this.cutoff = Math.min(1, toRate / fromRate);
    this.halfTaps = Math.ceil(halfTaps / this.cutoff);
    this.history = new Float32Array(2 * this.halfTaps); // the input around the next output
    this.offset = this.history.length; // position of the next output within history: no delay
  }

  process(input) {
    const x = new Float32Array(this.history.length + input.length);
    x.set(this.history);
    x.set(input, this.history.length);
    const out = [];
    const h = this.halfTaps;
    let t = this.offset;
    for (; t + h < x.length; t += this.step) {
      const centre = Math.floor(t);
      let sum = 0;
      for (let k = centre - h + 1; k <= centre + h; k++) {
        const d = t - k;
        const window = 0.5 + 0.5 * Math.cos((Math.PI * d) / h);
        const arg = Math.PI * this.cutoff * d;
        sum += x[k] * (arg === 0 ? 1 : Math.sin(arg) / arg) * window;
      }
      out.push(sum * this.cutoff);
    }
    const keep = Math.floor(t) - h; // first sample a later output still needs
    this.history = x.slice(keep);
    this.offset = t - keep;
    return Float32Array.from(out);
  }
}
