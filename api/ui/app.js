// inferq dashboard: one page, hash routes, short polling. Plain ES2020, no
// dependencies, no build step. Everything from the API is untrusted text: it
// reaches the DOM only through textContent / createElement, never innerHTML.
'use strict';

(() => {
  // The sign-in page loads this file too, only to show the error note.
  if (document.body.dataset.page === 'login') {
    const params = new URLSearchParams(location.search);
    const note = document.getElementById('login-error');
    if (note && params.has('error')) note.hidden = false;
    return;
  }

  const POLL_MS = 2000;
  const HISTORY_MS = 5 * 60 * 1000;
  const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
  const STATUSES = ['scheduled', 'queued', 'running', 'succeeded', 'failed', 'cancelled'];
  const PRIORITIES = ['high', 'normal', 'low'];

  // ---------------------------------------------------------------- DOM helpers

  const PROPS = new Set(['value', 'disabled', 'checked', 'selected', 'hidden', 'type', 'name']);

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [k, v] of Object.entries(props)) {
        if (v === null || v === undefined || v === false) continue;
        if (k === 'class') node.className = v;
        else if (k === 'text') node.textContent = String(v);
        else if (k === 'testid') node.setAttribute('data-testid', v);
        else if (k === 'dataset') Object.assign(node.dataset, v);
        else if (k.startsWith('on') && typeof v === 'function') node.addEventListener(k.slice(2), v);
        else if (PROPS.has(k)) node[k] = v;
        else node.setAttribute(k, v === true ? '' : String(v));
      }
    }
    append(node, children);
    return node;
  }

  function append(node, children) {
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      if (Array.isArray(c)) append(node, c);
      else if (c instanceof Node) node.appendChild(c);
      else node.appendChild(document.createTextNode(String(c)));
    }
  }

  function setText(node, text) {
    const t = String(text);
    if (node.textContent !== t) node.textContent = t;
  }

  function badge(status, testid) {
    return el('span', { class: `badge ${status || ''}`, testid, text: status || '—' });
  }

  // Rows keyed by id: a row whose data did not change is kept as it is, so
  // polling does not replace what the user is about to click.
  function keyedRows(tbody, items, keyOf, build, colspan, emptyText) {
    const old = new Map();
    for (const tr of tbody.children) if (tr.dataset.key) old.set(tr.dataset.key, tr);
    const rows = [];
    for (const item of items) {
      const key = keyOf(item);
      const sig = JSON.stringify(item);
      let tr = old.get(key);
      if (!tr || tr._sig !== sig) {
        tr = build(item);
        tr.dataset.key = key;
        tr._sig = sig;
      }
      rows.push(tr);
    }
    if (rows.length === 0) {
      const prev = tbody.firstElementChild;
      if (prev && prev.classList.contains('empty-row') && tbody.children.length === 1) return;
      rows.push(el('tr', { class: 'empty-row' }, el('td', { colspan, class: 'empty', text: emptyText })));
    }
    const same = rows.length === tbody.children.length && rows.every((r, i) => tbody.children[i] === r);
    if (!same) tbody.replaceChildren(...rows);
  }

  // ---------------------------------------------------------------- formatting

  const pad = (n) => String(n).padStart(2, '0');

  function fmtTime(iso) {
    if (!iso) return '—';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function timeCell(iso) {
    return el('td', { title: iso || '', text: fmtTime(iso) });
  }

  function fmtAge(seconds) {
    if (seconds === null || seconds === undefined) return '—';
    const s = Number(seconds);
    if (!Number.isFinite(s)) return '—';
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${pad(Math.round(s % 60))}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  function fmtDuration(startIso, endIso) {
    if (!startIso || !endIso) return '—';
    const ms = new Date(endIso) - new Date(startIso);
    if (!Number.isFinite(ms)) return '—';
    if (ms < 1000) return `${ms} ms`;
    return fmtAge(ms / 1000);
  }

  // Ids are UUIDv7: the first digits are a timestamp shared by ids made
  // together, so the short form keeps the random tail too.
  const shortId = (id) => {
    if (!id) return '—';
    const s = String(id);
    return s.length > 16 ? `${s.slice(0, 8)}…${s.slice(-6)}` : s;
  };

  function oneLine(text, max = 90) {
    if (text === null || text === undefined) return '';
    const t = String(text).replace(/\s+/g, ' ').trim();
    return t.length > max ? `${t.slice(0, max - 1)}…` : t;
  }

  const num = (v) => (v === null || v === undefined ? '—' : String(v));

  // datetime-local <-> RFC 3339 (the hash keeps RFC 3339).
  function toLocalInput(iso) {
    if (!iso) return '';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return '';
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
  }

  function fromLocalInput(v) {
    if (!v) return '';
    const d = new Date(v);
    return Number.isNaN(d.getTime()) ? '' : d.toISOString();
  }

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(message, status, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  let leaving = false;
  function goLogin() {
    if (leaving) return;
    leaving = true;
    location.assign('/ui/login');
  }

  async function api(method, path, body) {
    const opts = { method, credentials: 'same-origin', headers: { Accept: 'application/json' } };
    if (body !== undefined) {
      opts.headers['Content-Type'] = 'application/json';
      opts.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, opts);
    } catch (e) {
      throw new ApiError(`cannot reach the API (${e.message})`, 0, 'network');
    }
    if (res.status === 401) {
      goLogin();
      throw new ApiError('signed out: the admin token is needed', 401, 'unauthorized');
    }
    const text = await res.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (_) { data = null; }
    }
    if (!res.ok) {
      const e = data && data.error;
      let message = e && e.message ? e.message : `HTTP ${res.status} ${res.statusText}`;
      if (e && e.field && !message.includes(e.field)) message = `${e.field}: ${message}`;
      throw new ApiError(message, res.status, e && e.code);
    }
    return data;
  }

  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== '') q.set(k, v);
    const s = q.toString();
    return s ? `?${s}` : '';
  }

  // ---------------------------------------------------------------- routing and polling

  const viewRoot = document.getElementById('view');
  const live = document.getElementById('live');
  let current = null;
  let timer = null;
  let seq = 0;
  let rendered = 0;

  function parseHash() {
    const raw = location.hash.replace(/^#\/?/, '');
    const q = raw.indexOf('?');
    const path = q >= 0 ? raw.slice(0, q) : raw;
    const params = new URLSearchParams(q >= 0 ? raw.slice(q + 1) : '');
    const parts = path.split('/').filter(Boolean).map((p) => {
      try { return decodeURIComponent(p); } catch (_) { return p; }
    });
    return { name: parts[0] || 'queues', arg: parts[1] || '', params };
  }

  function hashFor(name, params) {
    const s = params ? new URLSearchParams(
      Object.entries(params).filter(([, v]) => v !== null && v !== undefined && v !== ''),
    ).toString() : '';
    return `#/${name}${s ? `?${s}` : ''}`;
  }

  // Sets the hash; when it is already that, reloads the view instead.
  function navigate(hash) {
    if (location.hash === hash) route();
    else location.hash = hash;
  }

  const routes = {
    queues: queuesView,
    tasks: (r) => taskListView('tasks', r),
    dlq: (r) => taskListView('dlq', r),
    task: taskView,
    batches: batchesView,
    batch: batchView,
  };

  function route() {
    if (current && current.destroy) current.destroy();
    const r = parseHash();
    for (const a of document.querySelectorAll('.nav a')) {
      const on = a.dataset.route === r.name ||
        (a.dataset.route === 'tasks' && r.name === 'task') ||
        (a.dataset.route === 'batches' && r.name === 'batch');
      a.classList.toggle('active', on);
    }
    const factory = routes[r.name] || notFoundView;
    current = factory(r);
    viewRoot.replaceChildren(current.root);
    document.title = `inferq · ${current.title || r.name}`;
    refreshNow();
  }

  function refreshNow() {
    clearTimeout(timer);
    timer = setTimeout(tick, 0);
  }

  function setLive(text, cls) {
    setText(live, text);
    live.className = `live ${cls || ''}`;
  }

  async function tick() {
    timer = null;
    const v = current;
    if (!v || !v.load) return;
    if (document.hidden) {
      setLive('paused (tab hidden)', 'paused');
      return; // visibilitychange starts it again
    }
    const my = ++seq;
    try {
      const data = await v.load();
      if (v !== current || my < rendered) return;
      rendered = my;
      v.error('');
      v.render(data);
      const polling = !v.shouldPoll || v.shouldPoll();
      setLive(polling ? `live · updated ${fmtTime(new Date().toISOString()).slice(11)}` : 'finished · not refreshing',
        polling ? '' : 'paused');
    } catch (e) {
      if (v !== current) return;
      v.error(e.message || String(e));
      setLive('error', 'paused');
    }
    if (v === current && (!v.shouldPoll || v.shouldPoll())) {
      clearTimeout(timer);
      timer = setTimeout(tick, POLL_MS);
    }
  }

  document.addEventListener('visibilitychange', () => {
    if (!document.hidden) refreshNow();
    else clearTimeout(timer);
  });
  window.addEventListener('hashchange', route);

  // ---------------------------------------------------------------- page scaffold

  function scaffold(name, title, subtitle) {
    const head = el('div', { class: 'page-head' }, el('h1', { text: title }),
      subtitle ? el('span', { class: 'sub', text: subtitle }) : null);
    const errorBox = el('div', { class: 'banner error', role: 'alert', testid: 'error' });
    const noticeBox = el('div', { class: 'banner notice', testid: 'notice' });
    const body = el('div');
    const root = el('section', { class: 'page', testid: `page-${name}` }, head, errorBox, noticeBox, body);
    return {
      root, head, body,
      error(msg) { setText(errorBox, msg || ''); },
      notice(...parts) { noticeBox.replaceChildren(); append(noticeBox, parts); },
    };
  }

  // Runs an action from a button: disables it meanwhile, shows an error.
  async function act(page, button, fn) {
    if (button) button.disabled = true;
    try {
      await fn();
    } catch (e) {
      page.error(e.message || String(e));
    } finally {
      if (button) button.disabled = false;
    }
  }

  function notFoundView(r) {
    const p = scaffold('notfound', 'Not found');
    p.body.append(el('p', null, `No page "${r.name}". `, el('a', { href: '#/queues', text: 'Go to queues' })));
    return { root: p.root, title: 'not found', error: p.error };
  }

  // ---------------------------------------------------------------- charts

  // name -> [{t, depth, thr}], the last five minutes of polled values,
  // kept across page changes.
  const queueHistory = new Map();

  function recordQueues(queues) {
    const t = Date.now();
    for (const q of queues) {
      let h = queueHistory.get(q.name);
      if (!h) { h = []; queueHistory.set(q.name, h); }
      const lm = q.last_minute || {};
      h.push({
        t,
        depth: (Number(q.ready) || 0) + (Number(q.scheduled) || 0),
        thr: (Number(lm.succeeded) || 0) + (Number(lm.failed) || 0),
      });
      while (h.length && h[0].t < t - HISTORY_MS) h.shift();
    }
  }

  function niceMax(v) {
    if (v <= 4) return 4;
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function drawChart(canvas, points, key, color) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 280;
    const h = canvas.clientHeight || 90;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const L = 34, R = 6, T = 6, B = 16;
    const pw = w - L - R, ph = h - T - B;
    const now = Date.now();
    const t0 = now - HISTORY_MS;
    const max = niceMax(points.reduce((m, p) => Math.max(m, p[key]), 0));
    const x = (t) => L + ((t - t0) / HISTORY_MS) * pw;
    const y = (v) => T + ph - (v / max) * ph;

    ctx.font = '10px system-ui, sans-serif';
    ctx.fillStyle = '#8a93a6';
    ctx.strokeStyle = '#e6e9ef';
    ctx.lineWidth = 1;
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    for (const v of [0, max / 2, max]) {
      const yy = Math.round(y(v)) + 0.5;
      ctx.beginPath(); ctx.moveTo(L, yy); ctx.lineTo(w - R, yy); ctx.stroke();
      ctx.fillText(Number.isInteger(v) ? String(v) : v.toFixed(1), L - 5, yy);
    }
    ctx.textBaseline = 'alphabetic';
    ctx.textAlign = 'left'; ctx.fillText('−5 min', L, h - 3);
    ctx.textAlign = 'right'; ctx.fillText('now', w - R, h - 3);

    const pts = points.filter((p) => p.t >= t0);
    if (pts.length === 0) return;
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.75;
    ctx.lineJoin = 'round';
    ctx.beginPath();
    pts.forEach((p, i) => (i === 0 ? ctx.moveTo(x(p.t), y(p[key])) : ctx.lineTo(x(p.t), y(p[key]))));
    ctx.stroke();
    // area under the line
    ctx.lineTo(x(pts[pts.length - 1].t), y(0));
    ctx.lineTo(x(pts[0].t), y(0));
    ctx.closePath();
    ctx.globalAlpha = 0.12;
    ctx.fillStyle = color;
    ctx.fill();
    ctx.globalAlpha = 1;
    const last = pts[pts.length - 1];
    ctx.beginPath();
    ctx.arc(x(last.t), y(last[key]), 2.5, 0, Math.PI * 2);
    ctx.fillStyle = color;
    ctx.fill();
  }

  // ---------------------------------------------------------------- queues page

  function queuesView() {
    const p = scaffold('queues', 'Queues', 'one queue per model · refreshed every 2 s');
    const tbody = el('tbody', { testid: 'queues-body' });
    const table = el('table', { class: 'grid', testid: 'queues-table' },
      el('thead', null, el('tr', null,
        el('th', { text: 'Queue' }),
        el('th', { text: 'State' }),
        el('th', { class: 'num', text: 'Ready (high · normal · low)' }),
        el('th', { class: 'num', text: 'Scheduled' }),
        el('th', { class: 'num', text: 'Running' }),
        el('th', { class: 'num', text: 'Dead letters' }),
        el('th', { class: 'num', text: 'Oldest ready' }),
        el('th', { class: 'num', text: 'Finished last min' }),
        el('th', { text: '' }))),
      tbody);
    const charts = el('div', { class: 'charts', testid: 'queue-charts' });
    p.body.append(el('div', { class: 'table-wrap' }, table), charts);

    const rows = new Map(); // name -> {tr, update}
    const cards = new Map(); // name -> {card, update}
    let emptyRow = null;

    function queueRow(name) {
      const cells = {};
      const c = (key, cls) => (cells[key] = el('td', { class: cls, testid: `queue-${key}-${name}` }));
      const button = el('button', { class: 'small' });
      let paused = false;
      button.addEventListener('click', () => act(p, button, async () => {
        const verb = paused ? 'resume' : 'pause';
        const res = await api('POST', `/queues/${encodeURIComponent(name)}/${verb}`);
        update({ ...last, paused: res && typeof res.paused === 'boolean' ? res.paused : !paused });
        refreshNow();
      }));
      const tr = el('tr', { testid: `queue-row-${name}`, dataset: { queue: name } },
        el('td', null, el('a', { href: hashFor('tasks', { model: name }), title: 'tasks of this queue' },
          el('b', { text: name }))),
        c('state'),
        c('ready', 'num'),
        c('scheduled', 'num'),
        c('running', 'num'),
        c('dead', 'num'),
        c('oldest', 'num'),
        c('throughput', 'num'),
        el('td', null, el('div', { class: 'actions' }, button)));
      let last = null;
      function update(q) {
        last = q;
        paused = !!q.paused;
        tr.dataset.paused = String(paused);
        const state = paused ? 'paused' : 'active';
        if (cells.state.textContent !== state) cells.state.replaceChildren(badge(state, `queue-paused-${name}`));
        const rb = q.ready_by_priority || {};
        cells.ready.replaceChildren(
          el('b', { text: num(q.ready) }), ' ',
          el('span', { class: 'prio', text: `(${num(rb.high)} · ${num(rb.normal)} · ${num(rb.low)})` }));
        setText(cells.scheduled, num(q.scheduled));
        setText(cells.running, num(q.running));
        const dead = Number(q.failed) || 0;
        cells.dead.replaceChildren(dead > 0
          ? el('a', { href: hashFor('dlq', { model: name }), text: String(dead) })
          : document.createTextNode(num(q.failed)));
        setText(cells.oldest, fmtAge(q.oldest_ready_age_seconds));
        const lm = q.last_minute || {};
        const ok = Number(lm.succeeded) || 0;
        const bad = Number(lm.failed) || 0;
        cells.throughput.replaceChildren(
          el('b', { text: `${ok + bad}/min` }), ' ',
          el('span', { class: 'prio' },
            '(', el('span', { testid: `queue-succeeded-${name}`, text: String(ok) }), ' ok · ',
            el('span', { testid: `queue-failed-${name}`, text: String(bad) }), ' failed)'));
        setText(button, paused ? 'Resume' : 'Pause');
        button.setAttribute('data-testid', paused ? `resume-${name}` : `pause-${name}`);
        button.className = paused ? 'small primary' : 'small';
        button.title = paused ? 'workers take this queue again' : 'workers stop taking this queue';
      }
      return { tr, update };
    }

    function chartCard(name) {
      const depthCanvas = el('canvas', { class: 'chart', testid: `chart-depth-${name}` });
      const thrCanvas = el('canvas', { class: 'chart', testid: `chart-throughput-${name}` });
      const depthNow = el('b');
      const thrNow = el('b');
      const card = el('div', { class: 'chart-card', testid: `queue-chart-${name}` },
        el('h3', { text: name }),
        el('div', { class: 'chart-pair' },
          el('figure', null, el('figcaption', null, el('span', { text: 'Depth (ready + scheduled)' }), depthNow), depthCanvas),
          el('figure', null, el('figcaption', null, el('span', { text: 'Throughput (finished / min)' }), thrNow), thrCanvas)));
      function update() {
        const h = queueHistory.get(name) || [];
        const last = h[h.length - 1];
        setText(depthNow, last ? String(last.depth) : '—');
        setText(thrNow, last ? `${last.thr}/min` : '—');
        drawChart(depthCanvas, h, 'depth', '#2f6fdf');
        drawChart(thrCanvas, h, 'thr', '#1f8a4c');
      }
      return { card, update };
    }

    return {
      root: p.root,
      title: 'queues',
      error: p.error,
      async load() {
        const data = await api('GET', '/queues');
        const queues = (data && data.queues) || [];
        recordQueues(queues);
        return queues;
      },
      render(queues) {
        const names = new Set(queues.map((q) => q.name));
        for (const [name, r] of rows) if (!names.has(name)) { r.tr.remove(); rows.delete(name); }
        for (const [name, c] of cards) if (!names.has(name)) { c.card.remove(); cards.delete(name); }
        if (queues.length === 0) {
          if (!emptyRow) {
            emptyRow = el('tr', null, el('td', { colspan: 9, class: 'empty', text: 'No queues yet: submit a task and its model gets one.' }));
            tbody.append(emptyRow);
          }
        } else if (emptyRow) {
          emptyRow.remove();
          emptyRow = null;
        }
        const sorted = [...queues].sort((a, b) => String(a.name).localeCompare(String(b.name)));
        sorted.forEach((q, i) => {
          let r = rows.get(q.name);
          if (!r) { r = queueRow(q.name); rows.set(q.name, r); }
          r.update(q);
          if (tbody.children[i] !== r.tr) tbody.insertBefore(r.tr, tbody.children[i] || null);
          let c = cards.get(q.name);
          if (!c) { c = chartCard(q.name); cards.set(q.name, c); }
          if (charts.children[i] !== c.card) charts.insertBefore(c.card, charts.children[i] || null);
          c.update();
        });
      },
    };
  }

  // ---------------------------------------------------------------- tasks and dead letters

  const TASK_FILTERS = ['status', 'model', 'batch_id', 'priority', 'error_contains', 'finished_after', 'finished_before', 'limit'];
  const DLQ_FILTERS = ['model', 'batch_id', 'error_contains', 'finished_after', 'finished_before', 'limit'];

  function filterForm(fields, values, onApply, onClear) {
    const inputs = {};
    const f = (key, label, input) => {
      inputs[key] = input;
      return el('div', { class: 'field' }, el('label', { for: `f-${key}`, text: label }), input);
    };
    const select = (key, options) => {
      const s = el('select', { id: `f-${key}`, name: key, testid: `filter-${key}` },
        el('option', { value: '', text: 'any' }),
        options.map((o) => el('option', { value: o, text: o })));
      s.value = values.get(key) || '';
      return s;
    };
    const text = (key, placeholder, cls) => el('input', {
      id: `f-${key}`, name: key, type: 'text', class: cls, placeholder, testid: `filter-${key}`,
      value: values.get(key) || '',
    });
    const time = (key) => el('input', {
      id: `f-${key}`, name: key, type: 'datetime-local', testid: `filter-${key}`,
      value: toLocalInput(values.get(key)),
    });
    const parts = [];
    if (fields.includes('status')) parts.push(f('status', 'Status', select('status', STATUSES)));
    if (fields.includes('model')) parts.push(f('model', 'Model', text('model', 'e.g. llama3', 'w-sm')));
    if (fields.includes('batch_id')) parts.push(f('batch_id', 'Batch id', text('batch_id', 'uuid', 'w-id')));
    if (fields.includes('priority')) parts.push(f('priority', 'Priority', select('priority', PRIORITIES)));
    if (fields.includes('error_contains')) parts.push(f('error_contains', 'Error contains', text('error_contains', 'text', 'w-sm')));
    if (fields.includes('finished_after')) parts.push(f('finished_after', 'Finished after', time('finished_after')));
    if (fields.includes('finished_before')) parts.push(f('finished_before', 'Finished before', time('finished_before')));
    const form = el('form', { class: 'filters', testid: 'filters' }, parts,
      el('div', { class: 'actions' },
        el('button', { type: 'submit', class: 'primary', testid: 'filter-apply', text: 'Apply' }),
        el('button', { type: 'button', testid: 'filter-clear', text: 'Clear', onclick: onClear })));
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      const out = {};
      for (const [key, input] of Object.entries(inputs)) {
        const v = input.type === 'datetime-local' ? fromLocalInput(input.value) : input.value.trim();
        if (v) out[key] = v;
      }
      if (values.get('limit')) out.limit = values.get('limit');
      onApply(out);
    });
    return form;
  }

  function pager(params, nextCursor, go) {
    const box = el('div', { class: 'pager', testid: 'pager' });
    if (params.get('cursor')) {
      box.append(el('button', { testid: 'first-page', text: '⇤ First page', onclick: () => go(null) }));
    }
    const next = el('button', { testid: 'next-page', text: 'Next page →', disabled: !nextCursor });
    if (nextCursor) next.addEventListener('click', () => go(nextCursor));
    box.append(next);
    return box;
  }

  function taskLink(id) {
    return el('a', { href: `#/task/${encodeURIComponent(id)}`, testid: `task-link-${id}`, title: id, class: 'mono', text: shortId(id) });
  }

  function batchLink(id) {
    if (!id) return document.createTextNode('—');
    return el('a', { href: `#/batch/${encodeURIComponent(id)}`, title: id, class: 'mono', text: shortId(id) });
  }

  function summary(t) {
    if (t.error) return oneLine(t.error);
    if (t.result && typeof t.result === 'object' && t.result.text !== undefined) return oneLine(t.result.text);
    return '';
  }

  // The task table of the tasks page and of a batch's page.
  function tasksTable() {
    const tbody = el('tbody', { testid: 'tasks-body' });
    const table = el('table', { class: 'grid', testid: 'tasks-table' },
      el('thead', null, el('tr', null,
        el('th', { text: 'Task' }), el('th', { text: 'Status' }), el('th', { text: 'Model' }),
        el('th', { text: 'Priority' }), el('th', { class: 'num', text: 'Attempts' }),
        el('th', { text: 'Created' }), el('th', { text: 'Finished' }), el('th', { text: 'Result / error' }))),
      tbody);
    function build(t) {
      const s = summary(t);
      return el('tr', { testid: `task-row-${t.id}` },
        el('td', null, taskLink(t.id)),
        el('td', null, badge(t.status)),
        el('td', { text: t.model }),
        el('td', { text: t.priority || '—' }),
        el('td', { class: 'num', text: `${num(t.attempts)} / ${num(t.max_attempts)}` }),
        timeCell(t.created_at),
        timeCell(t.finished_at),
        el('td', { class: `wrap${t.error ? ' err' : ''}`, title: s, text: s }));
    }
    return {
      node: el('div', { class: 'table-wrap' }, table),
      render(tasks, emptyText) { keyedRows(tbody, tasks, (t) => t.id, build, 8, emptyText); },
    };
  }

  function submitForm(p) {
    const model = el('input', { type: 'text', name: 'model', placeholder: 'model', required: true, testid: 'submit-model' });
    const priority = el('select', { name: 'priority', testid: 'submit-priority' },
      PRIORITIES.map((o) => el('option', { value: o, text: o, selected: o === 'normal' })));
    const prompt = el('textarea', { name: 'prompt', placeholder: 'prompt', required: true, testid: 'submit-prompt' });
    const button = el('button', { type: 'submit', class: 'primary', testid: 'submit-task', text: 'Submit' });
    const form = el('form', null,
      el('div', { class: 'field' }, el('label', { text: 'Model' }), model),
      el('div', { class: 'field' }, el('label', { text: 'Priority' }), priority),
      el('div', { class: 'field' }, el('label', { text: 'Prompt' }), prompt),
      button);
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      act(p, button, async () => {
        const body = { model: model.value.trim(), prompt: prompt.value, priority: priority.value };
        const res = await api('POST', '/tasks', body);
        p.notice('Submitted task ', taskLink(res.id), '.');
        prompt.value = '';
        refreshNow();
      });
    });
    return el('details', { class: 'panel submit-form', testid: 'submit-form' }, el('summary', { text: 'Submit a prompt' }), form);
  }

  function taskListView(kind, r) {
    const dlq = kind === 'dlq';
    const params = r.params;
    const p = dlq
      ? scaffold('dlq', 'Dead letters', 'tasks that ended failed; re-drive runs them again with fresh attempts')
      : scaffold('tasks', 'Tasks', 'newest first');
    const fields = dlq ? DLQ_FILTERS : TASK_FILTERS;
    const filters = {};
    for (const k of fields) if (params.get(k)) filters[k] = params.get(k);
    const cursor = params.get('cursor') || '';

    const form = filterForm(fields, params,
      (out) => navigate(hashFor(kind, out)),
      () => navigate(hashFor(kind)));
    p.body.append(el('div', { class: 'panel' }, form));

    let redriveAll = null;
    if (dlq) {
      // POST /dlq/redrive takes the same filters as the list (not limit/cursor),
      // so "all matching" is exactly what the pages show.
      const bulk = {
        model: filters.model, batch_id: filters.batch_id, error_contains: filters.error_contains,
        finished_after: filters.finished_after, finished_before: filters.finished_before,
      };
      const named = Object.entries(bulk).filter(([, v]) => v);
      redriveAll = el('button', { class: 'primary', testid: 'redrive-all', text: 'Re-drive all matching' });
      const why = named.length === 0 ? 'Set a filter first: re-drive all never takes every dead letter at once.' : '';
      redriveAll.disabled = !!why;
      redriveAll.title = why || 'Re-drive every dead letter matching these filters (all pages)';
      redriveAll.addEventListener('click', () => {
        const desc = named.map(([k, v]) => `${k} = "${v}"`).join(', ');
        if (!window.confirm(`Re-drive every dead letter with ${desc}? This includes those on later pages.`)) return;
        act(p, redriveAll, async () => {
          const body = {};
          for (const [k, v] of named) body[k] = v;
          const res = await api('POST', '/dlq/redrive', body);
          p.notice(`Re-drove ${res.redriven} task${res.redriven === 1 ? '' : 's'}.`);
          refreshNow();
        });
      });
      p.body.append(el('div', { class: 'actions spaced' }, redriveAll,
        why ? el('span', { class: 'muted', text: why }) : null));
    } else {
      p.body.append(submitForm(p));
    }

    const pagerBox = el('div');
    let table;
    if (dlq) {
      const tbody = el('tbody', { testid: 'dlq-body' });
      const t = el('table', { class: 'grid', testid: 'dlq-table' },
        el('thead', null, el('tr', null,
          el('th', { text: 'Task' }), el('th', { text: 'Model' }), el('th', { text: 'Batch' }),
          el('th', { class: 'num', text: 'Attempts' }), el('th', { text: 'Finished' }),
          el('th', { text: 'Error' }), el('th', { text: '' }))),
        tbody);
      const build = (task) => {
        const button = el('button', { class: 'small', testid: `redrive-${task.id}`, text: 'Re-drive' });
        button.addEventListener('click', () => act(p, button, async () => {
          const res = await api('POST', '/dlq/redrive', { task_id: task.id });
          if (res.redriven > 0) p.notice('Re-drove task ', taskLink(task.id), '.');
          else p.notice('Task ', taskLink(task.id), ' was not re-driven (no longer failed).');
          refreshNow();
        }));
        return el('tr', { testid: `dlq-row-${task.id}` },
          el('td', null, taskLink(task.id)),
          el('td', { text: task.model }),
          el('td', null, batchLink(task.batch_id)),
          el('td', { class: 'num', text: `${num(task.attempts)} / ${num(task.max_attempts)}` }),
          timeCell(task.finished_at),
          el('td', { class: 'wrap err', title: task.error || '', text: oneLine(task.error, 120) }),
          el('td', null, el('div', { class: 'actions' }, button)));
      };
      table = {
        node: el('div', { class: 'table-wrap' }, t),
        render(tasks, emptyText) { keyedRows(tbody, tasks, (x) => x.id, build, 7, emptyText); },
      };
    } else {
      table = tasksTable();
    }
    p.body.append(table.node, pagerBox);

    let lastNext;
    return {
      root: p.root,
      title: dlq ? 'dead letters' : 'tasks',
      error: p.error,
      load: () => api('GET', `/${dlq ? 'dlq' : 'tasks'}${query({ ...filters, cursor })}`),
      render(data) {
        const tasks = (data && data.tasks) || [];
        table.render(tasks, dlq ? 'No dead letters match.' : 'No tasks match.');
        const next = data ? data.next_cursor : null;
        if (next !== lastNext || !pagerBox.firstChild) {
          lastNext = next;
          pagerBox.replaceChildren(pager(params, next,
            (c) => navigate(hashFor(kind, { ...filters, cursor: c }))));
        }
      },
    };
  }

  // ---------------------------------------------------------------- one task

  function taskView(r) {
    const id = r.arg;
    const p = scaffold('task', 'Task', null);
    const idLine = el('code', { testid: 'task-id', text: id });
    p.head.append(idLine);
    const content = el('div');
    p.body.append(content);
    let task = null;
    let lastSig = '';
    let followUntil = 0; // keep refreshing for a while after a re-drive

    function kv(pairs) {
      return el('dl', { class: 'kv' }, pairs.map(([k, v, testid]) =>
        [el('dt', { text: k }), el('dd', { testid }, v instanceof Node ? v : String(v === null || v === undefined ? '—' : v))]));
    }

    function historyTable(history) {
      const byRun = new Map();
      for (const h of history) {
        const run = h.run === undefined || h.run === null ? 1 : h.run;
        if (!byRun.has(run)) byRun.set(run, []);
        byRun.get(run).push(h);
      }
      const rows = [];
      for (const run of [...byRun.keys()].sort((a, b) => a - b)) {
        const attempts = byRun.get(run).sort((a, b) => (a.attempt || 0) - (b.attempt || 0));
        const lastOutcome = attempts[attempts.length - 1].outcome || 'running';
        rows.push(el('tr', { class: 'run-head', testid: `history-run-${run}`, dataset: { outcome: lastOutcome } },
          el('td', { colspan: 6 }, `Run ${run} · `, badge(lastOutcome, `history-run-outcome-${run}`),
            ` · ${attempts.length} attempt${attempts.length === 1 ? '' : 's'}`)));
        for (const a of attempts) {
          const outcome = a.outcome || 'running';
          rows.push(el('tr', { testid: `history-row-${run}-${a.attempt}` },
            el('td', { class: 'num', text: `${run}.${a.attempt}` }),
            el('td', null, badge(outcome, `history-outcome-${run}-${a.attempt}`)),
            timeCell(a.started_at),
            timeCell(a.finished_at),
            el('td', { class: 'num', text: fmtDuration(a.started_at, a.finished_at) }),
            el('td', { class: `wrap${a.error ? ' err' : ''}`, testid: `history-error-${run}-${a.attempt}`, text: a.error || '' })));
        }
      }
      if (rows.length === 0) rows.push(el('tr', null, el('td', { colspan: 6, class: 'empty', text: 'Not started yet.' })));
      return el('div', { class: 'table-wrap' }, el('table', { class: 'grid', testid: 'history' },
        el('thead', null, el('tr', null,
          el('th', { class: 'num', text: 'Run.attempt' }), el('th', { text: 'Outcome' }),
          el('th', { text: 'Started' }), el('th', { text: 'Finished' }), el('th', { class: 'num', text: 'Took' }),
          el('th', { text: 'Error' }))),
        el('tbody', null, rows)));
    }

    function render(t) {
      const actions = el('div', { class: 'actions' });
      if (t.status === 'failed') {
        const b = el('button', { class: 'primary', testid: 'task-redrive', text: 'Re-drive' });
        b.addEventListener('click', () => act(p, b, async () => {
          const res = await api('POST', '/dlq/redrive', { task_id: t.id });
          p.notice(res.redriven > 0 ? 'Re-driven: it runs again with fresh attempts.' : 'Not re-driven (no longer failed).');
          followUntil = Date.now() + 120000;
          refreshNow();
        }));
        actions.append(b);
      }
      if (!TERMINAL.has(t.status)) {
        const b = el('button', { class: 'danger', testid: 'task-cancel', text: 'Cancel task' });
        b.addEventListener('click', () => {
          if (!window.confirm('Cancel this task? A running attempt is stopped and the task will not run again.')) return;
          act(p, b, async () => {
            await api('DELETE', `/tasks/${encodeURIComponent(t.id)}`);
            p.notice('Cancelled.');
            refreshNow();
          });
        });
        actions.append(b);
      }
      const progress = t.progress === null || t.progress === undefined ? null
        : (typeof t.progress === 'object' ? JSON.stringify(t.progress) : String(t.progress));
      const parts = [
        el('div', { class: 'panel' },
          el('div', { class: 'page-head split' },
            el('div', null, 'Status ', badge(t.status, 'task-status')), actions),
          kv([
            ['Model', t.model, 'task-model'],
            ['Priority', t.priority, 'task-priority'],
            ['Batch', t.batch_id ? batchLink(t.batch_id) : '—', 'task-batch'],
            ['Attempts', `${num(t.attempts)} of ${num(t.max_attempts)}`, 'task-attempts'],
            ['Run', t.run === undefined ? '—' : t.run, 'task-run'],
            ['Created', fmtTime(t.created_at)],
            ['Run at', fmtTime(t.run_at)],
            ['Started', fmtTime(t.started_at)],
            ['Finished', fmtTime(t.finished_at)],
            ['Cache', t.cache === undefined ? '—' : String(t.cache)],
            ['Progress', progress],
          ])),
      ];
      if (t.error) {
        parts.push(el('h2', { text: 'Error' }), el('pre', { class: 'text err', testid: 'task-error', text: t.error }));
      }
      if (t.result !== null && t.result !== undefined) {
        const res = t.result;
        const text = typeof res === 'object' && res.text !== undefined ? res.text : null;
        parts.push(el('h2', { text: 'Result' }));
        if (text !== null) parts.push(el('pre', { class: 'text', testid: 'task-result', text: String(text) }));
        const rest = typeof res === 'object' ? { ...res } : { value: res };
        delete rest.text;
        if (Object.keys(rest).length) {
          parts.push(el('pre', { class: 'text muted gap-top', testid: 'task-result-meta', text: JSON.stringify(rest, null, 2) }));
        }
      }
      if (t.metadata !== null && t.metadata !== undefined && !(typeof t.metadata === 'object' && Object.keys(t.metadata).length === 0)) {
        parts.push(el('h2', { text: 'Metadata' }), el('pre', { class: 'text', text: JSON.stringify(t.metadata, null, 2) }));
      }
      parts.push(el('h2', { text: 'History' }), historyTable(t.history || []));
      content.replaceChildren(...parts);
    }

    return {
      root: p.root,
      title: `task ${shortId(id)}`,
      error: p.error,
      load: () => api('GET', `/tasks/${encodeURIComponent(id)}`),
      render(t) {
        task = t;
        const sig = JSON.stringify(t);
        if (sig !== lastSig) { lastSig = sig; render(t); }
      },
      shouldPoll: () => !task || !TERMINAL.has(task.status) || Date.now() < followUntil,
    };
  }

  // ---------------------------------------------------------------- batches

  function progressBar(b, testid) {
    const c = b.counts || {};
    const total = Number(b.total) || 0;
    const s = Number(c.succeeded) || 0, f = Number(c.failed) || 0, x = Number(c.cancelled) || 0;
    const pct = (n) => (total ? `${(n / total) * 100}%` : '0%');
    return el('div', { class: 'progress', title: `${s} succeeded · ${f} failed · ${x} cancelled of ${total}` },
      el('div', { class: 'bar' }, [['s', s], ['f', f], ['c', x]].map(([cls, n]) => {
        const seg = el('span', { class: cls });
        seg.style.width = pct(n); // CSSOM, not a style attribute
        return seg;
      })),
      el('span', { class: 'label', testid, text: `${s + f + x}/${total}` }));
  }

  function countsText(b) {
    const c = b.counts || {};
    const waiting = (Number(c.queued) || 0) + (Number(c.scheduled) || 0);
    return `${num(c.succeeded)} ok · ${num(c.failed)} failed · ${num(c.cancelled)} cancelled · ${num(c.running)} running · ${waiting} waiting`;
  }

  function batchesView(r) {
    const params = r.params;
    const cursor = params.get('cursor') || '';
    const limit = params.get('limit') || '';
    const p = scaffold('batches', 'Batches', 'newest first');
    const tbody = el('tbody', { testid: 'batches-body' });
    const table = el('table', { class: 'grid', testid: 'batches-table' },
      el('thead', null, el('tr', null,
        el('th', { text: 'Batch' }), el('th', { text: 'Status' }), el('th', { text: 'Progress (finished / total)' }),
        el('th', { text: 'Counts' }), el('th', { text: 'Created' }), el('th', { text: 'Completed' }))),
      tbody);
    const pagerBox = el('div');
    p.body.append(el('div', { class: 'table-wrap' }, table), pagerBox);
    const build = (b) => el('tr', { testid: `batch-row-${b.id}` },
      el('td', null, el('a', { href: `#/batch/${encodeURIComponent(b.id)}`, testid: `batch-link-${b.id}`, title: b.id, class: 'mono', text: shortId(b.id) })),
      el('td', null, badge(b.status, `batch-status-${b.id}`)),
      el('td', null, progressBar(b, `batch-progress-${b.id}`)),
      el('td', { class: 'muted', text: countsText(b) }),
      timeCell(b.created_at),
      timeCell(b.completed_at));
    let lastNext;
    return {
      root: p.root,
      title: 'batches',
      error: p.error,
      load: () => api('GET', `/batches${query({ limit, cursor })}`),
      render(data) {
        keyedRows(tbody, (data && data.batches) || [], (b) => b.id, build, 6, 'No batches yet.');
        const next = data ? data.next_cursor : null;
        if (next !== lastNext || !pagerBox.firstChild) {
          lastNext = next;
          pagerBox.replaceChildren(pager(params, next, (c) => navigate(hashFor('batches', { limit, cursor: c }))));
        }
      },
    };
  }

  function batchView(r) {
    const id = r.arg;
    const params = r.params;
    const cursor = params.get('cursor') || '';
    const p = scaffold('batch', 'Batch', null);
    p.head.append(el('code', { testid: 'batch-id', text: id }));
    const summaryBox = el('div', { class: 'panel' });
    const tasks = tasksTable();
    const pagerBox = el('div');
    p.body.append(summaryBox,
      el('div', { class: 'actions spaced' },
        el('a', { href: hashFor('tasks', { batch_id: id }), text: 'Filter its tasks' }), ' · ',
        el('a', { href: hashFor('dlq', { batch_id: id }), text: 'Its dead letters' })),
      tasks.node, pagerBox);
    let batch = null;
    let lastSig = '';
    let lastNext;
    return {
      root: p.root,
      title: `batch ${shortId(id)}`,
      error: p.error,
      async load() {
        const [b, t] = await Promise.all([
          api('GET', `/batches/${encodeURIComponent(id)}`),
          api('GET', `/tasks${query({ batch_id: id, cursor })}`),
        ]);
        return { b, t };
      },
      render({ b, t }) {
        batch = b;
        const sig = JSON.stringify(b);
        if (sig !== lastSig) {
          lastSig = sig;
          summaryBox.replaceChildren(
            el('div', { class: 'page-head' }, 'Status ', badge(b.status, 'batch-status'),
              el('span', { class: 'grow' }), progressBar(b, 'batch-progress')),
            el('p', { class: 'muted', text: countsText(b) }),
            el('dl', { class: 'kv' },
              el('dt', { text: 'Total' }), el('dd', { text: num(b.total) }),
              el('dt', { text: 'Created' }), el('dd', { text: fmtTime(b.created_at) }),
              el('dt', { text: 'Completed' }), el('dd', { text: fmtTime(b.completed_at) }),
              el('dt', { text: 'Metadata' }), el('dd', { class: 'mono', text: b.metadata ? JSON.stringify(b.metadata) : '—' })));
        }
        tasks.render((t && t.tasks) || [], 'No tasks on this page.');
        const next = t ? t.next_cursor : null;
        if (next !== lastNext || !pagerBox.firstChild) {
          lastNext = next;
          pagerBox.replaceChildren(pager(params, next,
            (c) => navigate(`#/batch/${encodeURIComponent(id)}${c ? `?cursor=${encodeURIComponent(c)}` : ''}`)));
        }
      },
      // A finished batch's tasks do not change; an unfinished one's do.
      shouldPoll: () => !batch || batch.status !== 'completed',
    };
  }

  // ---------------------------------------------------------------- start

  route();
})();
