/*
 * The dashboard's presence panel and the operator's topics and disconnect
 * form. Plain ES2017, loaded after dashboard.js.
 *
 * It talks to the server on the page's own Socket.IO connection
 * (window.tidings.socket): `presence` acks, and the `joins` / `leaves` /
 * `unsubscribed` events. User ids and topics are untrusted text: rendered
 * with textContent only.
 */
(function () {
  'use strict';

  var TOPIC_RE = /^[A-Za-z0-9_.\-]{1,128}$/;
  var EVERY_MS = 2000;
  var OPS_KEY = 'tidings.apiKey'; // the operator view's key (dashboard.js keeps it)

  function $(id) { return document.getElementById(id); }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  var client = window.tidings;
  var socket = client && client.socket;
  if (!socket) return;

  /* ---- presence of one topic ------------------------------------------ */

  var ui = {
    form: $('presence-form'),
    topic: $('presence-topic'),
    status: $('presence-status'),
    users: $('presence-users'),
    count: $('presence-count'),
    subscribeTopic: $('topic'),
    subscribeForm: $('subscribe-form'),
  };
  var shown = '';
  var timer = null;
  var round = 0;

  function status(text, bad) {
    ui.status.textContent = text;
    ui.status.classList.toggle('error', !!bad);
  }

  function render(ack) {
    clear(ui.users);
    (ack.users || []).forEach(function (user) {
      var item = el('li', 'user');
      item.setAttribute('data-sub', String(user.sub));
      item.appendChild(el('span', 'sub', String(user.sub)));
      item.appendChild(el('span', 'clients', '×' + String(user.clients)));
      ui.users.appendChild(item);
    });
    ui.count.textContent = String(ack.clients);
    var anonymous = ack.clients - (ack.users || []).reduce(function (n, u) { return n + u.clients; }, 0);
    var users = (ack.users || []).length;
    status(users + (users === 1 ? ' user, ' : ' users, ') +
      ack.clients + (ack.clients === 1 ? ' connection' : ' connections') +
      (anonymous > 0 ? ' (' + anonymous + ' anonymous)' : ''));
  }

  function refresh() {
    if (timer !== null) clearTimeout(timer);
    timer = null;
    if (!shown) return;
    var mine = ++round;
    var topic = shown;
    if (!socket.connected) {
      timer = setTimeout(refresh, EVERY_MS);
      return;
    }
    socket.timeout(10000).emit('presence', { topic: topic }, function (err, ack) {
      if (mine !== round) return;
      timer = setTimeout(refresh, EVERY_MS);
      if (err || !ack) return status('No answer; retrying…', true);
      if (!ack.ok) {
        clear(ui.users);
        ui.count.textContent = '0';
        var why = {
          presence_off: 'This topic keeps no presence.',
          forbidden: 'You may not subscribe to this topic, so you may not see who does.',
        }[ack.error] || 'Presence unavailable: ' + ack.error;
        return status(why, true);
      }
      render(ack);
    });
  }

  function show(topic) {
    shown = topic;
    ui.topic.value = topic;
    status('loading…');
    refresh();
  }

  ui.form.addEventListener('submit', function (event) {
    event.preventDefault();
    var topic = ui.topic.value.trim();
    if (!TOPIC_RE.test(topic)) return status('A topic is 1 to 128 characters of A-Z a-z 0-9 _ . -', true);
    show(topic);
  });

  // The topic just subscribed to is the one to show, unless one is shown already.
  ui.subscribeForm.addEventListener('submit', function () {
    var topic = ui.subscribeTopic.value.trim();
    if (!shown && TOPIC_RE.test(topic)) setTimeout(function () { show(topic); }, 300);
  });

  function onMembership(items) {
    if (!Array.isArray(items)) return;
    if (items.some(function (item) { return item && item.topic === shown; })) refresh();
  }
  socket.on('joins', onMembership);
  socket.on('leaves', onMembership);
  socket.on('unsubscribed', function (info) {
    if (info && info.topic === shown) status('The server unsubscribed you from ' + info.topic + '.', true);
  });

  /* ---- operator: topics and disconnect (behind the API key) ---------- */

  var ops = {
    panel: $('ops'),
    body: $('ops-body'),
    topics: $('ops-topics'),
    noTopics: $('ops-no-topics'),
    form: $('ops-disconnect'),
    sub: $('ops-disconnect-sub'),
    status: $('ops-disconnect-status'),
  };

  function key() {
    try { return sessionStorage.getItem(OPS_KEY) || ''; } catch (e) { return ''; }
  }

  function api(method, path, body) {
    return fetch(path, {
      method: method,
      headers: { Authorization: 'Bearer ' + key(), Accept: 'application/json',
        'Content-Type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: 'same-origin',
      cache: 'no-store',
    }).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (answer) {
        answer.status = response.status;
        return answer;
      });
    });
  }

  function renderTopics(list) {
    clear(ops.topics);
    list.forEach(function (entry) {
      var row = el('tr');
      row.setAttribute('data-topic', String(entry.topic));
      row.appendChild(el('td', 'topic', String(entry.topic)));
      row.appendChild(el('td', 'num', String(entry.clients)));
      ops.topics.appendChild(row);
    });
    ops.noTopics.hidden = list.length > 0;
  }

  function pollTopics() {
    if (key() && ops.panel.open && !ops.body.hidden) {
      api('GET', '/api/topics').then(function (answer) {
        if (answer.status === 200) renderTopics(answer.topics || []);
      }).catch(function () { /* the operator view says the server is unreachable */ });
    }
    setTimeout(pollTopics, EVERY_MS);
  }
  pollTopics();

  ops.form.addEventListener('submit', function (event) {
    event.preventDefault();
    var sub = ops.sub.value.trim();
    if (!sub) return;
    ops.status.textContent = 'disconnecting…';
    api('POST', '/api/disconnect', { sub: sub }).then(function (answer) {
      if (answer.status !== 200) {
        ops.status.textContent = 'Refused: ' + (answer.error || 'HTTP ' + answer.status);
        return;
      }
      ops.status.textContent = 'Disconnected ' + answer.disconnected + ' connection' +
        (answer.disconnected === 1 ? '' : 's') + ' of ' + sub +
        (answer.answered < answer.nodes ? ' (' + (answer.nodes - answer.answered) + ' nodes did not answer)' : '');
    }).catch(function () {
      ops.status.textContent = 'Server unreachable.';
    });
  });
})();
