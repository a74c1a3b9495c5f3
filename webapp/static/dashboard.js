/*
 * The Tidings live dashboard (GET /). Plain ES2017, no framework.
 *
 * Publication data is untrusted: it is only ever rendered with textContent,
 * never parsed as HTML.
 */
(function () {
  'use strict';

  var MAX_ROWS = 500;
  var TOKEN_KEY = 'tidings.token';
  var TRANSPORT_KEY = 'tidings.transport';
  var TRANSPORTS = ['websocket', 'sse'];
  var isValidTopic = window.Tidings.isValidTopic;

  function $(id) { return document.getElementById(id); }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function pretty(data) {
    try {
      var text = JSON.stringify(data, null, 2);
      return text === undefined ? String(data) : text;
    } catch (e) {
      return String(data);
    }
  }

  // The token, the API key and the transport last for this tab only; with
  // storage disabled, for this page only.
  function readStored(key) {
    try { return sessionStorage.getItem(key) || ''; } catch (e) { return ''; }
  }

  function writeStored(key, value) {
    try {
      if (value) sessionStorage.setItem(key, value);
      else sessionStorage.removeItem(key);
    } catch (e) { /* storage disabled */ }
  }

  var ui = {
    state: $('state'),
    recovered: $('recovered'),
    form: $('subscribe-form'),
    topic: $('topic'),
    subscribeError: $('subscribe-error'),
    subscriptions: $('subscriptions'),
    noSubscriptions: $('no-subscriptions'),
    list: $('publications'),
    empty: $('empty'),
    count: $('count'),
    clear: $('clear'),
    startJob: $('start-job'),
    jobProgress: $('job-progress'),
    jobStatus: $('job-status'),
    jobTopic: $('job-topic'),
    tokenForm: $('token-form'),
    token: $('token'),
    tokenClear: $('token-clear'),
    transport: $('transport'),
  };

  var token = readStored(TOKEN_KEY);
  var transport = readStored(TRANSPORT_KEY);
  if (TRANSPORTS.indexOf(transport) < 0) transport = 'websocket';
  var options = { transport: transport };
  if (token) options.token = token;
  var client = new window.Tidings(options);
  window.tidings = client; // handy from the devtools console

  ui.transport.value = transport;
  ui.transport.addEventListener('change', function () {
    writeStored(TRANSPORT_KEY, ui.transport.value);
    location.reload();
  });

  /* ---- connection state and recovery notice ------------------------- */

  var recoveredSinceConnect = 0;

  client.on('state', function (state) {
    ui.state.textContent = state;
    ui.state.setAttribute('data-state', state);
    if (state === 'connected') recoveredSinceConnect = 0;
  });

  client.on('recovered', function (info) {
    recoveredSinceConnect += info.count;
    ui.recovered.textContent = 'recovered ' + recoveredSinceConnect;
    ui.recovered.title = 'Publications missed while disconnected, replayed from history';
    ui.recovered.hidden = false;
  });

  client.on('gap', function (info) {
    showError('Publications on ' + info.topic + ' were missed while disconnected' +
      ' and history could not replay them; showing new ones from now on.');
  });

  client.on('error', function (info) {
    if (info.error === 'unavailable') {
      showError('The server cannot reach Redis for ' + info.topic + '; retrying…');
    } else if (info.error === 'sse_unavailable') {
      showError('Server-Sent Events are not available on this server (no GET /sse);' +
        ' switch the transport back to WebSocket.');
    } else if (info.topic === null) {
      showError('Connection refused: ' + info.error +
        (info.error === 'invalid_token' ? ' (check the access token)' : ''));
    }
  });

  function showError(text) {
    ui.subscribeError.textContent = text;
    ui.subscribeError.hidden = !text;
  }

  /* ---- publications ------------------------------------------------- */

  var rowCount = 0;

  function renderRow(pub, recovered) {
    var row = el('li', 'publication' + (recovered ? ' is-recovered' : ''));
    row.setAttribute('data-topic', pub.topic);
    row.setAttribute('data-offset', pub.offset);

    var meta = el('div', 'meta');
    meta.appendChild(el('span', 'topic', pub.topic));
    meta.appendChild(el('span', 'offset', pub.offset));
    if (recovered) meta.appendChild(el('span', 'badge', 'recovered'));
    var time = el('time', 'received', new Date().toLocaleTimeString());
    time.setAttribute('datetime', new Date().toISOString());
    meta.appendChild(time);

    row.appendChild(meta);
    row.appendChild(el('pre', 'data', pretty(pub.data)));
    return row;
  }

  function showPublications(pubs, info) {
    pubs.forEach(function (pub) {
      // Each publication goes on top: the list reads newest first.
      ui.list.insertBefore(renderRow(pub, info.recovered), ui.list.firstChild);
      rowCount++;
    });
    while (ui.list.children.length > MAX_ROWS) ui.list.removeChild(ui.list.lastChild);
    ui.count.textContent = String(rowCount);
    ui.empty.hidden = ui.list.children.length > 0;
  }

  ui.clear.addEventListener('click', function () {
    while (ui.list.firstChild) ui.list.removeChild(ui.list.firstChild);
    rowCount = 0;
    ui.count.textContent = '0';
    ui.empty.hidden = false;
  });

  /* ---- subscriptions ------------------------------------------------ */

  var subscriptionRows = new Map(); // topic -> <li>

  function refreshSubscriptionsHint() {
    ui.noSubscriptions.hidden = subscriptionRows.size > 0;
  }

  function removeSubscriptionRow(topic) {
    var row = subscriptionRows.get(topic);
    if (row) row.remove();
    subscriptionRows.delete(topic);
    refreshSubscriptionsHint();
  }

  function addSubscriptionRow(topic) {
    if (subscriptionRows.has(topic)) return subscriptionRows.get(topic);
    var row = el('li', 'subscription pending');
    row.setAttribute('data-topic', topic);
    row.appendChild(el('span', 'dot'));
    row.appendChild(el('code', 'name', topic));
    var button = el('button', 'unsubscribe secondary', 'Unsubscribe');
    button.type = 'button';
    button.setAttribute('aria-label', 'Unsubscribe from ' + topic);
    button.addEventListener('click', function () { unsubscribe(topic); });
    row.appendChild(button);
    ui.subscriptions.appendChild(row);
    subscriptionRows.set(topic, row);
    refreshSubscriptionsHint();
    return row;
  }

  function subscribe(topic, handler, opts) {
    var row = addSubscriptionRow(topic);
    return client.subscribe(topic, handler || showPublications, opts).then(function (ack) {
      if (ack.ok) {
        row.classList.remove('pending');
        if (ui.subscribeError.textContent.indexOf('cannot reach Redis') >= 0) showError('');
      } else if (ack.error !== 'unsubscribed') {
        removeSubscriptionRow(topic);
        showError('Cannot subscribe to ' + topic + ': ' + ack.error);
      }
      return ack;
    });
  }

  function unsubscribe(topic) {
    removeSubscriptionRow(topic);
    return client.unsubscribe(topic);
  }

  ui.form.addEventListener('submit', function (event) {
    event.preventDefault();
    var topic = ui.topic.value.trim();
    if (!isValidTopic(topic)) {
      showError('A topic is 1 to 128 characters of A-Z a-z 0-9 _ . -');
      return;
    }
    showError('');
    subscribe(topic);
  });

  /* ---- progress demo ------------------------------------------------ */

  function setJob(percent, status) {
    ui.jobProgress.value = Math.max(0, Math.min(100, percent));
    ui.jobStatus.textContent = status;
  }

  function onJobPublications(topic) {
    return function (pubs, info) {
      showPublications(pubs, info);
      pubs.forEach(function (pub) {
        var d = pub.data || {};
        if (d.done === true) {
          setJob(100, 'done');
          ui.startJob.disabled = false;
          unsubscribe(topic);
        } else if (typeof d.percent === 'number') {
          var step = typeof d.step === 'number' && typeof d.steps === 'number'
            ? 'step ' + d.step + ' of ' + d.steps + ' · ' : '';
          setJob(d.percent, step + d.percent + '%');
        }
      });
    };
  }

  ui.startJob.addEventListener('click', function () {
    ui.startJob.disabled = true;
    setJob(0, 'starting…');
    ui.jobTopic.textContent = '';
    fetch('/api/demo/progress', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
      body: '{}',
      credentials: 'same-origin',
    }).then(function (response) {
      if (!response.ok) throw new Error('HTTP ' + response.status);
      return response.json();
    }).then(function (job) {
      if (!job || !isValidTopic(job.topic)) throw new Error('unexpected answer');
      ui.jobTopic.textContent = job.topic;
      ui.jobStatus.textContent = 'queued';
      // A fresh topic: from its beginning, so steps published before the
      // subscription took effect are recovered too. A new SSE stream cannot
      // start from an offset (the client would report a gap): from now.
      var from = client.transport === 'websocket' ? {since: '0-0'} : {};
      return subscribe(job.topic, onJobPublications(job.topic), from);
    }).then(function (ack) {
      if (!ack.ok && ack.error !== 'unsubscribed') throw new Error(ack.error);
    }).catch(function (err) {
      setJob(0, 'failed: ' + err.message);
      ui.startJob.disabled = false;
    });
  });

  /* ---- access token -------------------------------------------------- */

  ui.token.value = token;
  ui.tokenForm.addEventListener('submit', function (event) {
    event.preventDefault();
    writeStored(TOKEN_KEY, ui.token.value.trim());
    location.reload();
  });
  ui.tokenClear.addEventListener('click', function () {
    writeStored(TOKEN_KEY, '');
    location.reload();
  });

  /* ---- operator view (GET /api/ops, behind the API key) ------------- */

  var OPS_KEY = 'tidings.apiKey';
  var OPS_EVERY_MS = 2000;
  var ops = {
    panel: $('ops'),
    form: $('ops-form'),
    key: $('ops-key'),
    forget: $('ops-forget'),
    status: $('ops-status'),
    body: $('ops-body'),
    lease: $('ops-lease'),
    rate: $('ops-rate'),
    ingest: $('ops-ingest'),
    dropped: $('ops-dropped'),
    workers: $('ops-workers'),
    drops: $('ops-drops'),
    noDrops: $('ops-no-drops'),
  };
  var opsTimer = null;
  var opsRound = 0; // answers of an older round (a key since changed) are ignored

  var opsKey = readStored(OPS_KEY);

  function opsStatus(text, bad) {
    ops.status.textContent = text;
    ops.status.classList.toggle('error', !!bad);
  }

  function seconds(value) {
    if (typeof value !== 'number') return '?';
    if (value < 120) return value.toFixed(1) + ' s';
    if (value < 7200) return Math.round(value / 60) + ' min';
    return (value / 3600).toFixed(1) + ' h';
  }

  function sum(object) {
    var total = 0;
    Object.keys(object || {}).forEach(function (k) { total += Number(object[k]) || 0; });
    return total;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function renderOps(view) {
    var lease = view.lease || {};
    ops.lease.textContent = lease.held
      ? lease.host + ' pid ' + lease.pid + ', for ' + seconds(lease.age_s)
      : 'none: nothing is forwarded';
    ops.lease.classList.toggle('bad', !lease.held);
    var listener = view.listener || {};
    ops.rate.textContent = (Number(listener.rate) || 0).toFixed(1) + ' /s · ' +
      sum(listener.forwarded) + ' forwarded · ' + (listener.restarts || 0) + ' restarts';
    var ingest = view.ingest || {};
    ops.ingest.textContent = 'lag ' + (ingest.lag === null || ingest.lag === undefined ? '?' : ingest.lag) +
      ' · pending ' + (ingest.pending || 0) + ' · length ' + (ingest.length || 0);
    ops.dropped.textContent = String(sum(listener.dropped));

    clear(ops.workers);
    (view.web || []).forEach(function (worker) {
      var row = el('tr');
      row.setAttribute('data-worker', worker.worker);
      row.appendChild(el('td', 'worker', worker.worker));
      row.appendChild(el('td', 'num', String(worker.clients)));
      row.appendChild(el('td', 'num', String(worker.subscriptions)));
      row.appendChild(el('td', 'num', String(worker.messages_sent)));
      row.appendChild(el('td', worker.queue_ready ? 'ok' : 'bad', worker.queue_ready ? 'ok' : 'down'));
      ops.workers.appendChild(row);
    });

    clear(ops.drops);
    (view.recent_drops || []).slice(0, 10).forEach(function (drop) {
      var item = el('li', 'drop');
      item.appendChild(el('span', 'reason', String(drop.reason)));
      item.appendChild(el('code', 'topic', String(drop.topic)));
      item.appendChild(el('span', 'path', String(drop.path)));
      item.appendChild(el('time', 'when', new Date(Number(drop.ts)).toLocaleTimeString()));
      ops.drops.appendChild(item);
    });
    ops.noDrops.hidden = ops.drops.children.length > 0;
    ops.body.hidden = false;
    opsStatus('updated ' + new Date().toLocaleTimeString());
  }

  function stopOps() {
    if (opsTimer !== null) clearTimeout(opsTimer);
    opsTimer = null;
  }

  function pollOps() {
    stopOps();
    if (!opsKey) return;
    var round = ++opsRound;
    fetch('/api/ops', {
      headers: { Authorization: 'Bearer ' + opsKey, Accept: 'application/json' },
      credentials: 'same-origin',
      cache: 'no-store',
    }).then(function (response) {
      if (round !== opsRound) return null;
      if (response.status === 401) {
        opsStatus('Wrong API key.', true);
        ops.body.hidden = true;
        return null; // no retry with a key that is known to be wrong
      }
      if (response.status === 403) {
        opsStatus('The operator view is disabled: TIDINGS_API_KEY is not set.', true);
        ops.body.hidden = true;
        return null;
      }
      opsTimer = setTimeout(pollOps, OPS_EVERY_MS);
      if (!response.ok) {
        opsStatus(response.status === 503 ? 'Redis unavailable; retrying…' : 'HTTP ' + response.status, true);
        return null;
      }
      return response.json().then(function (view) {
        if (round === opsRound) renderOps(view);
      });
    }).catch(function () {
      if (round !== opsRound) return;
      opsStatus('Server unreachable; retrying…', true);
      stopOps();
      opsTimer = setTimeout(pollOps, OPS_EVERY_MS);
    });
  }

  ops.form.addEventListener('submit', function (event) {
    event.preventDefault();
    opsKey = ops.key.value.trim();
    writeStored(OPS_KEY, opsKey);
    ops.key.value = '';
    if (opsKey) {
      opsStatus('loading…');
      pollOps();
    }
  });
  ops.forget.addEventListener('click', function () {
    opsKey = '';
    opsRound++;
    writeStored(OPS_KEY, '');
    stopOps();
    ops.body.hidden = true;
    opsStatus('');
  });
  if (opsKey) {
    ops.panel.open = true;
    pollOps();
  }

  refreshSubscriptionsHint();
})();
