// The stem player's mixer: one object owns every stem's samples and makes the mix, so the
// stems can never drift apart. Loaded twice: as the AudioWorklet module (the mixer runs on
// the audio thread) and as a page script (the ScriptProcessor fallback where AudioWorklet
// is missing, and the offline render of the mix to download). No imports, no exports.
'use strict';

/** A periodic Hann window: two of them half a window apart sum to exactly 1. */
function hannWindow(size) {
  const w = new Float32Array(size);
  for (let n = 0; n < size; n++) w[n] = 0.5 - 0.5 * Math.cos((2 * Math.PI * n) / size);
  return w;
}

class StemMixer {
  constructor(sampleRate) {
    this.sampleRate = sampleRate;
    this.stems = []; // [[left, right]] Float32Arrays of equal length
    this.length = 0;
    this.gains = []; // target gain of each stem (mute and solo applied)
    this.current = []; // the gains of the last block (ramped towards `gains`, no clicks)
    this.pos = 0; // source frame now playing
    this.playing = false;
    this.ended = false;
    this.tempo = 1;
    this.pitch = 1; // 2^(semitones/12)
    this.loopOn = false;
    this.loopA = 0;
    this.loopB = 0;
    // Time-stretch and pitch-shift: WSOLA, grains of ~46 ms with Hann windows at 50 % overlap.
    this.grain = sampleRate > 60000 ? 4096 : 2048;
    this.hop = this.grain / 2;
    this.tolerance = this.hop / 2; // how far a grain may move to line up with the last one
    this.window = hannWindow(this.grain);
    this.gL = new Float32Array(this.grain);
    this.gR = new Float32Array(this.grain);
    this.tailL = new Float32Array(this.hop);
    this.tailR = new Float32Array(this.hop);
    this.qL = new Float32Array(this.hop);
    this.qR = new Float32Array(this.hop);
    this.qRead = this.hop;
    this.target = new Float32Array(this.hop);
    this.candidates = new Float32Array(2 * this.tolerance + this.hop);
    this.monoRight = new Float32Array(this.candidates.length);  // monoInto's scratch
    this.resetStretch(0);
  }

  load(stems) {
    this.stems = stems.map((channels) => [channels[0], channels[1] || channels[0]]);
    this.length = this.stems.reduce((most, s) => Math.max(most, s[0].length), 0);
    this.gains = this.stems.map(() => 1);
    this.current = this.stems.map(() => 1);
    this.loopB = this.length;
    this.seek(0);
  }

  get stretching() {
    return this.tempo !== 1 || this.pitch !== 1;
  }

  setGains(gains) {
    this.gains = gains.slice();
  }

  setRate(tempo, semitones) {
    const was = this.stretching;
    this.tempo = Math.min(1.5, Math.max(0.5, tempo));
    this.pitch = Math.pow(2, Math.min(12, Math.max(-12, semitones)) / 12);
    if (this.stretching && !was) this.resetStretch(this.pos);
    if (!this.stretching && was) this.pos = Math.max(0, Math.round(this.pos));
  }

  setLoop(on, a, b) {
    this.loopOn = !!on && b > a;
    this.loopA = Math.max(0, Math.floor(a));
    this.loopB = Math.min(this.length, Math.floor(b));
  }

  seek(frame) {
    this.pos = Math.min(Math.max(0, Math.floor(frame)), this.length);
    this.ended = this.pos >= this.length;
    this.resetStretch(this.pos);
  }

  resetStretch(frame) {
    this.nominal = frame; // where the next grain should be read from
    this.previous = -1; // where the last grain was read from (-1: none to line up with)
    this.tailL.fill(0);
    this.tailR.fill(0);
    this.qRead = this.hop;
  }

  /** The end of what plays now: the loop's end, or the track's. */
  get end() {
    return this.loopOn ? this.loopB : this.length;
  }

  /** Fill `left` and `right` (n frames each) with the mix, and move on. */
  process(left, right, n) {
    left.fill(0, 0, n);
    right.fill(0, 0, n);
    if (!this.playing || this.ended || this.length === 0) {
      this.current = this.gains.slice();
      return;
    }
    if (this.stretching) this.processStretched(left, right, n);
    else this.processDirect(left, right, n);
    this.current = this.gains.slice();
  }

  // At 100 % and 0 semitones: the stems' samples times their gains, nothing else.
  processDirect(left, right, n) {
    let done = 0;
    while (done < n) {
      const end = this.end;
      const count = Math.min(n - done, end - this.pos);
      if (count > 0) {
        for (let s = 0; s < this.stems.length; s++) {
          const g0 = this.current[s];
          const g1 = this.gains[s];
          if (g0 === 0 && g1 === 0) continue;
          const [l, r] = this.stems[s];
          const step = (g1 - g0) / n;
          for (let i = 0; i < count; i++) {
            const g = g0 === g1 ? g1 : g0 + step * (done + i + 1);
            const k = this.pos + i;
            if (k < l.length) {
              left[done + i] += g * l[k];
              right[done + i] += g * r[k];
            }
          }
        }
        this.pos += count;
        done += count;
      }
      if (this.pos >= end) {
        if (this.loopOn) this.pos = this.loopA;
        else {
          this.ended = true;
          return;
        }
      }
    }
  }

  // The mix of every stem at source position `start + j * step`, j < count (linear
  // interpolation between frames), added into `left` and `right` at `offset`.
  mixInto(left, right, start, step, count, offset) {
    for (let s = 0; s < this.stems.length; s++) {
      const g = this.gains[s];
      if (g === 0) continue;
      const [l, r] = this.stems[s];
      const last = l.length - 1;
      for (let j = 0; j < count; j++) {
        const x = start + j * step;
        if (x < 0 || x >= last) continue;
        const i = Math.floor(x);
        const f = x - i;
        left[offset + j] += g * (l[i] + f * (l[i + 1] - l[i]));
        right[offset + j] += g * (r[i] + f * (r[i + 1] - r[i]));
      }
    }
  }

  // Mono mix at `start + j * step` (for lining grains up): the stereo mix, summed.
  monoInto(out, start, step, count) {
    const right = this.monoRight;
    out.fill(0, 0, count);
    right.fill(0, 0, count);
    this.mixInto(out, right, start, step, count, 0);
    for (let j = 0; j < count; j++) out[j] += right[j];
  }

  processStretched(left, right, n) {
    let done = 0;
    while (done < n) {
      if (this.qRead >= this.hop) {
        if (this.ended) return;
        this.nextGrain();
      }
      const count = Math.min(n - done, this.hop - this.qRead);
      left.set(this.qL.subarray(this.qRead, this.qRead + count), done);
      right.set(this.qR.subarray(this.qRead, this.qRead + count), done);
      this.qRead += count;
      done += count;
    }
  }

  // WSOLA: read the next grain near `nominal` where it best continues the last grain,
  // resampled by `pitch` (the key), overlap-added half a grain after the last one; the
  // reading position moves on by hop * tempo (the speed).
  nextGrain() {
    const { hop, grain, pitch } = this;
    if (this.nominal >= this.end) {
      if (this.loopOn) this.resetStretch(this.loopA);
      else {
        this.ended = true;
        this.pos = this.length;
        return;
      }
    }
    let start = this.nominal;
    if (this.previous >= 0) start = this.align(this.previous + hop * pitch, this.nominal);
    this.gL.fill(0);
    this.gR.fill(0);
    this.mixInto(this.gL, this.gR, start, pitch, grain, 0);
    const w = this.window;
    for (let j = 0; j < hop; j++) {
      this.qL[j] = this.tailL[j] + w[j] * this.gL[j];
      this.qR[j] = this.tailR[j] + w[j] * this.gR[j];
      this.tailL[j] = w[j + hop] * this.gL[j + hop];
      this.tailR[j] = w[j + hop] * this.gR[j + hop];
    }
    this.qRead = 0;
    this.previous = start;
    this.pos = Math.min(this.length, this.nominal);
    this.nominal += hop * this.tempo;
  }

  // The start near `nominal` whose first half-grain is most like `natural` (the source
  // that would follow the last grain): normalised cross-correlation on every 4th sample.
  align(natural, nominal) {
    const { hop, tolerance, pitch } = this;
    this.monoInto(this.target, natural, pitch, hop);
    this.monoInto(this.candidates, nominal - tolerance * pitch, pitch, 2 * tolerance + hop);
    const t = this.target;
    const c = this.candidates;
    let best = tolerance;
    let bestScore = -Infinity;
    for (let d = 0; d <= 2 * tolerance; d += 2) {
      let dot = 0;
      let energy = 1e-9;
      for (let j = 0; j < hop; j += 4) {
        const v = c[d + j];
        dot += t[j] * v;
        energy += v * v;
      }
      const score = dot / Math.sqrt(energy);
      if (score > bestScore) {
        bestScore = score;
        best = d;
      }
    }
    return Math.max(0, nominal + (best - tolerance) * pitch);
  }
}

/** Apply a message of the page (see player.js) to `mixer`. */
function handleMixerMessage(mixer, msg) {
  switch (msg.type) {
    case 'load': mixer.load(msg.stems); break;
    case 'gains': mixer.setGains(msg.gains); break;
    case 'rate': mixer.setRate(msg.tempo, msg.semitones); break;
    case 'loop': mixer.setLoop(msg.on, msg.a, msg.b); break;
    case 'seek': mixer.seek(msg.frame); break;
    case 'play':
      if (mixer.ended) mixer.seek(mixer.loopOn ? mixer.loopA : 0);
      mixer.playing = true;
      break;
    case 'pause': mixer.playing = false; break;
    default: break;
  }
}

if (typeof registerProcessor === 'function') {
  class StemMixerProcessor extends AudioWorkletProcessor {
    constructor() {
      super();
      this.mixer = new StemMixer(sampleRate);
      this.blocks = 0;
      this.wasEnded = false;
      this.spare = new Float32Array(128);
      this.port.onmessage = (event) => handleMixerMessage(this.mixer, event.data);
    }

    process(inputs, outputs) {
      const out = outputs[0];
      const n = out[0].length;
      if (this.spare.length < n) this.spare = new Float32Array(n);
      this.mixer.process(out[0], out[1] || this.spare, n);
      const m = this.mixer;
      if (m.ended && !this.wasEnded) {
        m.playing = false;
        this.port.postMessage({ type: 'ended', frame: m.pos });
      }
      this.wasEnded = m.ended;
      if (++this.blocks % 8 === 0) this.port.postMessage({ type: 'pos', frame: m.pos, playing: m.playing });
      return true;
    }
  }
  registerProcessor('stem-mixer', StemMixerProcessor);
}
