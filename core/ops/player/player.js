// The stem player's page: loads the stems named in the page's JSON manifest, decodes them,
// hands them to one mixer (mixer.js: an AudioWorklet, or a ScriptProcessor where AudioWorklet
// is missing) and drives it from the controls. The mix to download is made here by the same
// mixer code, faster than real time, and written as a 16-bit WAV file.
'use strict';

(function () {
  const manifest = JSON.parse(document.getElementById('manifest').textContent);
  const scriptBase = new URL('.', document.currentScript.src);
  const $ = (id) => document.getElementById(id);
  const SEEK_STEP_S = 5;

  const state = {
    ctx: null,
    engine: null,
    analyser: null,
    stems: [], // {name, file, url, colour, channels, muted, solo, volume, row}
    channels: [],
    length: 0,
    rate: 44100,
    frame: 0,
    playing: false,
    dragging: false,
    tempo: 1,
    semitones: 0,
    loopA: 0,
    loopB: 0,
    loopOn: false,
  };

  function formatTime(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const ss = String(s % 60).padStart(2, '0');
    return h ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
  }

  function setStatus(text, isError) {
    const el = $('status');
    el.textContent = text;
    el.classList.toggle('error', !!isError);
    if (isError) document.body.dataset.state = 'error';
  }

  function element(tag, props, children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (k === 'text') el.textContent = v;
      else if (k === 'class') el.className = v;
      else el.setAttribute(k, v);
    }
    for (const child of children || []) el.appendChild(child);
    return el;
  }

  // -- the header ----------------------------------------------------------------------

  function showFacts() {
    const facts = $('facts');
    const add = (label, value) => {
      const li = element('li', {}, [document.createTextNode(label + ' '), element('strong', { text: value })]);
      facts.appendChild(li);
    };
    if (typeof manifest.bpm === 'number' && isFinite(manifest.bpm)) add('BPM', String(Math.round(manifest.bpm)));  // whole beats, as in the result message
    if (typeof manifest.key === 'string' && manifest.key) add('Key', manifest.key);
    add('Stems', String(manifest.stems.length));
    if (manifest.expires) {
      const until = new Date(manifest.expires * 1000);
      add('Link valid until', until.toLocaleString([], { dateStyle: 'medium', timeStyle: 'short' }));
    }
  }

  // -- stems -----------------------------------------------------------------------------

  function buildRows() {
    const list = $('stems');
    manifest.stems.forEach((stem, index) => {
      const label = stem.name.replace(/_/g, ' ');
      const row = element('li', { class: 'stem', 'data-stem': stem.name });
      row.style.setProperty('--c', stem.colour);
      const canvas = element('canvas', { 'aria-hidden': 'true' });
      const playhead = element('div', { class: 'playhead' });
      const region = element('div', { class: 'region' });
      const wave = element('div', { class: 'wave', title: `Waveform of ${label}: click to seek` }, [canvas, region, playhead]);
      const mute = element('button', { type: 'button', class: 'mute', 'aria-pressed': 'false', 'aria-label': `Mute ${label}`, text: 'M' });
      const solo = element('button', { type: 'button', class: 'solo', 'aria-pressed': 'false', 'aria-label': `Solo ${label} (key ${index + 1})`, text: 'S' });
      const volume = element('input', {
        type: 'range', class: 'volume', min: '0', max: '150', step: '1', value: '100',
        'aria-label': `Volume of ${label}`, 'aria-valuetext': '100%',
      });
      const download = element('a', {
        class: 'button download', href: stem.url, download: stem.file, rel: 'noreferrer',
        'aria-label': `Download ${label} (${stem.file})`, text: '⬇',
      });
      row.appendChild(element('div', { class: 'name' }, [element('span', { class: 'swatch', 'aria-hidden': 'true' }), element('span', { text: label })]));
      row.appendChild(wave);
      row.appendChild(element('div', { class: 'controls' }, [mute, solo, volume, download]));
      list.appendChild(row);
      const entry = { ...stem, label, channels: null, peaks: null, muted: false, solo: false, volume: 1, row, canvas, playhead, region, mute, solo_button: solo, volume_input: volume };
      mute.addEventListener('click', () => { entry.muted = !entry.muted; updateGains(); });
      solo.addEventListener('click', () => { entry.solo = !entry.solo; updateGains(); });
      volume.addEventListener('input', () => {
        entry.volume = Number(volume.value) / 100;
        volume.setAttribute('aria-valuetext', `${volume.value}%`);
        updateGains();
      });
      wave.addEventListener('click', (event) => {
        if (!state.length) return;
        const box = wave.getBoundingClientRect();
        seekTo(((event.clientX - box.left) / box.width) * state.length);
      });
      state.stems.push(entry);
    });
  }

  function gains() {
    const anySolo = state.stems.some((s) => s.solo);
    return state.stems.map((s) => (s.muted || (anySolo && !s.solo) ? 0 : s.volume));
  }

  function updateGains() {
    const g = gains();
    state.stems.forEach((s, i) => {
      s.mute.setAttribute('aria-pressed', String(s.muted));
      s.solo_button.setAttribute('aria-pressed', String(s.solo));
      s.row.classList.toggle('silent', g[i] === 0);
    });
    post({ type: 'gains', gains: g });
  }

  async function loadStem(ctx, stem, done) {
    let response;
    try {
      response = await fetch(stem.url, { credentials: 'omit', referrerPolicy: 'no-referrer' });
    } catch (err) {
      throw new Error(`couldn't fetch ${stem.label} (${err.message})`);
    }
    if (!response.ok) {
      const why = response.status === 410 ? 'the link has expired' : response.status === 404 ? 'the file was deleted' : `HTTP ${response.status}`;
      throw new Error(`couldn't fetch ${stem.label}: ${why}`);
    }
    const buffer = await ctx.decodeAudioData(await response.arrayBuffer());
    const channels = [buffer.getChannelData(0), buffer.numberOfChannels > 1 ? buffer.getChannelData(1) : buffer.getChannelData(0)];
    done();
    return channels;
  }

  function computePeaks(channels, buckets) {
    const [l, r] = channels;
    const peaks = new Float32Array(buckets);
    const per = Math.max(1, Math.floor(l.length / buckets));
    for (let b = 0; b < buckets; b++) {
      let peak = 0;
      const end = Math.min(l.length, (b + 1) * per);
      for (let i = b * per; i < end; i += 4) {
        const v = Math.abs(l[i] + r[i]) * 0.5;
        if (v > peak) peak = v;
      }
      peaks[b] = peak;
    }
    let top = 0;
    for (const p of peaks) top = Math.max(top, p);
    if (top > 0) for (let b = 0; b < buckets; b++) peaks[b] /= top;
    return peaks;
  }

  function drawWave(stem) {
    const canvas = stem.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(1, Math.round(canvas.clientWidth * ratio));
    const height = Math.max(1, Math.round(canvas.clientHeight * ratio));
    if (canvas.width !== width) canvas.width = width;
    if (canvas.height !== height) canvas.height = height;
    const g = canvas.getContext('2d');
    g.clearRect(0, 0, width, height);
    if (!stem.peaks) return;
    g.fillStyle = stem.colour;
    const mid = height / 2;
    const bar = Math.max(1, Math.round(2 * ratio));
    for (let x = 0; x < width; x += bar + 1) {
      const p = stem.peaks[Math.min(stem.peaks.length - 1, Math.floor((x / width) * stem.peaks.length))];
      const h = Math.max(1, p * (height - 4));
      g.fillRect(x, mid - h / 2, bar, h);
    }
  }

  // -- the mixer -------------------------------------------------------------------------

  async function makeEngine(ctx) {
    const onMessage = (msg) => {
      if (msg.type === 'pos') {
        state.frame = msg.frame;
      } else if (msg.type === 'ended') {
        state.frame = msg.frame;
        setPlaying(false);
      }
    };
    if (ctx.audioWorklet && typeof AudioWorkletNode === 'function') {
      try {
        await ctx.audioWorklet.addModule(new URL('mixer.js', scriptBase).href);
        const node = new AudioWorkletNode(ctx, 'stem-mixer', { numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [2] });
        node.port.onmessage = (event) => onMessage(event.data);
        return { kind: 'worklet', node, post: (msg) => node.port.postMessage(msg) };
      } catch (err) {
        console.warn('AudioWorklet unavailable, using a ScriptProcessor', err);
      }
    }
    // Plain http on another host than localhost has no AudioWorklet: the same mixer on this thread.
    const mixer = new StemMixer(ctx.sampleRate);
    const node = ctx.createScriptProcessor(2048, 0, 2);
    node.onaudioprocess = (event) => {
      const out = event.outputBuffer;
      const wasEnded = mixer.ended;
      mixer.process(out.getChannelData(0), out.getChannelData(1), out.length);
      if (mixer.ended && !wasEnded && mixer.playing) {
        mixer.playing = false;
        onMessage({ type: 'ended', frame: mixer.pos });
      } else onMessage({ type: 'pos', frame: mixer.pos });
    };
    return { kind: 'script-processor', node, post: (msg) => handleMixerMessage(mixer, msg) };
  }

  function post(msg) {
    if (state.engine) state.engine.post(msg);
  }

  function setPlaying(playing) {
    state.playing = playing;
    const button = $('play');
    button.textContent = playing ? '❚❚' : '▶';
    button.setAttribute('aria-label', playing ? 'Pause' : 'Play');
    if (document.body.dataset.state !== 'error') document.body.dataset.state = playing ? 'playing' : 'ready';
  }

  async function togglePlay() {
    if (!state.engine) return;
    if (state.playing) {
      post({ type: 'pause' });
      setPlaying(false);
    } else {
      await state.ctx.resume();
      if (state.frame >= state.length) state.frame = 0;
      post({ type: 'play' });
      setPlaying(true);
    }
  }

  function seekTo(frame) {
    state.frame = Math.max(0, Math.min(state.length, Math.round(frame)));
    post({ type: 'seek', frame: state.frame });
    render();
  }

  function sendLoop() {
    post({ type: 'loop', on: state.loopOn, a: state.loopA, b: state.loopB });
    const button = $('loop');
    button.setAttribute('aria-pressed', String(state.loopOn));
    $('loop-range').textContent = `${formatTime(state.loopA / state.rate)}–${formatTime(state.loopB / state.rate)}`;
    const left = (state.loopA / Math.max(1, state.length)) * 100;
    const width = ((state.loopB - state.loopA) / Math.max(1, state.length)) * 100;
    for (const s of state.stems) {
      s.region.classList.toggle('on', state.loopOn);
      s.region.style.left = `${left}%`;
      s.region.style.width = `${width}%`;
    }
  }

  function setLoopPoint(which) {
    if (which === 'a') {
      state.loopA = state.frame;
      if (state.loopB <= state.loopA) state.loopB = state.length;
    } else {
      state.loopB = state.frame;
      if (state.loopA >= state.loopB) state.loopA = 0;
    }
    if (state.loopB > state.loopA) state.loopOn = true;
    sendLoop();
  }

  function sendRate() {
    post({ type: 'rate', tempo: state.tempo, semitones: state.semitones });
    $('tempo-value').textContent = `${Math.round(state.tempo * 100)}%`;
    const st = state.semitones;
    $('transpose-value').textContent = `${st > 0 ? '+' : ''}${st} st`;
    $('tempo').setAttribute('aria-valuetext', `${Math.round(state.tempo * 100)} percent`);
    $('transpose').setAttribute('aria-valuetext', `${st > 0 ? 'up ' : st < 0 ? 'down ' : ''}${Math.abs(st)} semitones`);
  }

  function render() {
    const seconds = state.frame / state.rate;
    const time = $('time');
    time.textContent = formatTime(seconds);
    time.dataset.seconds = seconds.toFixed(3);
    if (!state.dragging) $('seek').value = String(seconds);
    const left = `${(state.frame / Math.max(1, state.length)) * 100}%`;
    for (const s of state.stems) s.playhead.style.left = left;
  }

  function tick() {
    render();
    requestAnimationFrame(tick);
  }

  // -- the mix to download ------------------------------------------------------------------

  function wavBlob(left, right, rate) {
    const frames = left.length;
    const view = new DataView(new ArrayBuffer(44 + frames * 4));
    const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
    text(0, 'RIFF');
    view.setUint32(4, 36 + frames * 4, true);
    text(8, 'WAVE');
    text(12, 'fmt ');
    view.setUint32(16, 16, true);
    view.setUint16(20, 1, true); // PCM
    view.setUint16(22, 2, true);
    view.setUint32(24, rate, true);
    view.setUint32(28, rate * 4, true);
    view.setUint16(32, 4, true);
    view.setUint16(34, 16, true);
    text(36, 'data');
    view.setUint32(40, frames * 4, true);
    let offset = 44;
    const sample = (v) => Math.max(-32768, Math.min(32767, Math.round(v * 32767)));
    for (let i = 0; i < frames; i++) {
      view.setInt16(offset, sample(left[i]), true);
      view.setInt16(offset + 2, sample(right[i]), true);
      offset += 4;
    }
    return new Blob([view.buffer], { type: 'audio/wav' });
  }

  /** The whole track as it sounds now (mutes, solos, volumes, tempo, key; no loop). */
  async function renderMix() {
    const mixer = new StemMixer(state.rate);
    mixer.load(state.channels);
    const g = gains();
    mixer.setGains(g);
    mixer.current = g.slice();
    mixer.setRate(state.tempo, state.semitones);
    mixer.playing = true;
    const total = Math.round(state.length / state.tempo);
    const left = new Float32Array(total);
    const right = new Float32Array(total);
    const block = 8192;
    const bl = new Float32Array(block);
    const br = new Float32Array(block);
    for (let done = 0, step = 0; done < total; step++) {
      const n = Math.min(block, total - done);
      mixer.process(bl, br, n);
      left.set(bl.subarray(0, n), done);
      right.set(br.subarray(0, n), done);
      done += n;
      if (step % 16 === 15) {
        setStatus(`Rendering the mix… ${Math.round((done / total) * 100)}%`);
        await new Promise((resolve) => setTimeout(resolve, 0)); // let the page breathe
      }
    }
    return wavBlob(left, right, state.rate);
  }

  async function downloadMix() {
    const button = $('download-mix');
    button.disabled = true;
    try {
      setStatus('Rendering the mix…');
      const blob = await renderMix();
      const base = String(manifest.title || 'track').replace(/\.[^.]+$/, '').replace(/[^\w.-]+/g, '_').slice(0, 80) || 'track';
      const st = state.semitones;
      const name = `${base}-mix-${Math.round(state.tempo * 100)}pct${st ? `${st > 0 ? '+' : ''}${st}st` : ''}.wav`;
      const url = URL.createObjectURL(blob);
      const a = element('a', { href: url, download: name });
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      setStatus(`Mix ready: ${name}`);
    } catch (err) {
      setStatus(`Couldn't render the mix: ${err.message}`, true);
    } finally {
      button.disabled = false;
    }
  }

  // -- keyboard --------------------------------------------------------------------------

  function onKey(event) {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const target = event.target;
    const tag = target && target.tagName;
    const onRange = tag === 'INPUT' && target.type === 'range';
    if (event.code === 'Space' || event.key === ' ') {
      if (tag === 'BUTTON' || tag === 'A') return; // the focused control's own action
      event.preventDefault();
      togglePlay();
    } else if ((event.key === 'ArrowLeft' || event.key === 'ArrowRight') && !onRange) {
      event.preventDefault();
      seekTo(state.frame + (event.key === 'ArrowRight' ? 1 : -1) * SEEK_STEP_S * state.rate);
    } else if (/^Digit[1-9]$/.test(event.code)) {
      const stem = state.stems[Number(event.code.slice(5)) - 1];
      if (!stem) return;
      event.preventDefault();
      if (event.shiftKey) stem.muted = !stem.muted;
      else stem.solo = !stem.solo;
      updateGains();
    } else if (event.key === 'l' || event.key === 'L') {
      state.loopOn = !state.loopOn && state.loopB > state.loopA;
      sendLoop();
    }
  }

  // -- start -------------------------------------------------------------------------------

  function wire() {
    $('play').addEventListener('click', togglePlay);
    const seek = $('seek');
    seek.addEventListener('input', () => { state.dragging = true; });
    seek.addEventListener('change', () => {
      state.dragging = false;
      seekTo(Number(seek.value) * state.rate);
    });
    $('tempo').addEventListener('input', (e) => { state.tempo = Number(e.target.value) / 100; sendRate(); });
    $('transpose').addEventListener('input', (e) => { state.semitones = Number(e.target.value); sendRate(); });
    $('loop-a').addEventListener('click', () => setLoopPoint('a'));
    $('loop-b').addEventListener('click', () => setLoopPoint('b'));
    $('loop').addEventListener('click', () => {
      state.loopOn = !state.loopOn && state.loopB > state.loopA;
      sendLoop();
    });
    $('reset').addEventListener('click', () => {
      state.tempo = 1;
      state.semitones = 0;
      $('tempo').value = '100';
      $('transpose').value = '0';
      state.loopOn = false;
      state.loopA = 0;
      state.loopB = state.length;
      sendRate();
      sendLoop();
    });
    $('download-mix').addEventListener('click', downloadMix);
    document.addEventListener('keydown', onKey);
    if (typeof ResizeObserver === 'function') new ResizeObserver(() => state.stems.forEach(drawWave)).observe($('stems'));
  }

  async function start() {
    showFacts();
    buildRows();
    wire();
    const Context = window.AudioContext || window.webkitAudioContext;
    if (!Context) {
      setStatus('This browser cannot play the stems (no Web Audio).', true);
      return;
    }
    const ctx = new Context({ latencyHint: 'playback' });
    state.ctx = ctx;
    state.rate = ctx.sampleRate;
    let loaded = 0;
    const total = state.stems.length;
    setStatus(`Loading the stems… 0/${total}`);
    try {
      const [engine, channels] = await Promise.all([
        makeEngine(ctx),
        Promise.all(state.stems.map((stem) => loadStem(ctx, stem, () => setStatus(`Loading the stems… ${++loaded}/${total}`)))),
      ]);
      state.engine = engine;
      state.length = channels.reduce((most, c) => Math.max(most, c[0].length), 0);
      // Every stem as long as the longest, so one frame index means one instant in all.
      state.channels = channels.map(([l, r]) => {
        if (l.length === state.length) return [l, r];
        const pl = new Float32Array(state.length);
        const pr = new Float32Array(state.length);
        pl.set(l);
        pr.set(r);
        return [pl, pr];
      });
      state.stems.forEach((s, i) => {
        s.channels = state.channels[i];
        s.peaks = computePeaks(s.channels, 2000);
        drawWave(s);
      });
      state.loopB = state.length;
      const analyser = ctx.createAnalyser();
      analyser.fftSize = 2048;
      engine.node.connect(analyser);
      analyser.connect(ctx.destination);
      state.analyser = analyser;
      post({ type: 'load', stems: state.channels });
      updateGains();
      sendRate();
      const seconds = state.length / state.rate;
      $('seek').max = String(seconds);
      $('duration').textContent = formatTime(seconds);
      $('loop-range').textContent = 'off';
      for (const id of ['play', 'seek', 'download-mix']) $(id).disabled = false;
      setStatus(`Ready: ${total} stem${total === 1 ? '' : 's'}, ${formatTime(seconds)}.`);
      document.body.dataset.state = 'ready';
      document.body.dataset.engine = engine.kind;
      requestAnimationFrame(tick);
    } catch (err) {
      setStatus(`Couldn't load the player: ${err.message}`, true);
    }
  }

  // For people and tests who look under the hood: the loudness of what plays now.
  window.stemPlayer = {
    level() {
      if (!state.analyser) return 0;
      const data = new Float32Array(state.analyser.fftSize);
      state.analyser.getFloatTimeDomainData(data);
      let sum = 0;
      for (const v of data) sum += v * v;
      return Math.sqrt(sum / data.length);
    },
  };

  start();
})();
