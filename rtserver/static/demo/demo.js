// The demo inbox: rtclient.js in a plain page. ?user=ID connects at once;
// ?backoff=MS shortens reconnect delays (the browser tests use it).
import { RTClient } from '/static/rtclient.js';

const $ = (sel) => document.querySelector(sel);
const params = new URLSearchParams(location.search);
const wsUrl = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
let client = null;

async function mint(userId, role = 'user') {
  const resp = await fetch('/api/test/token', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ user_id: userId, role, topics: ['case:*'] }),
  });
  if (!resp.ok) throw new Error(`token: HTTP ${resp.status}`);
  return (await resp.json()).token;
}

function setStatus(state, text) {
  const el = $('#status');
  el.dataset.state = state;
  el.textContent = text;
}

function setBadge(count) {
  const badge = $('#badge');
  badge.textContent = count > 99 ? '99+' : String(count);
  badge.dataset.count = String(count);
  document.title = count ? `(${count}) rtserver · demo inbox` : 'rtserver · demo inbox';
}

function timeAgo(iso) {
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return 'just now';
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}

function render(note, { prepend = true } = {}) {
  if (document.querySelector(`.notification[data-id="${CSS.escape(note.id)}"]`)) return;
  const li = document.createElement('li');
  const unread = !note.read && !note.broadcast; // broadcasts are not kept per user
  li.className = `notification type-${note.type}${unread ? ' unread' : ''}${note.broadcast ? ' broadcast' : ''}`;
  li.dataset.id = note.id;
  const extras = Object.entries(note)
    .filter(([k]) => !['id', 'user_id', 'message', 'type', 'created_at', 'read', 'read_at', 'delivered_at', 'broadcast', 'replayed'].includes(k))
    .map(([k, v]) => `<span class="chip">${escapeHtml(k)}: ${escapeHtml(String(v))}</span>`)
    .join('');
  li.innerHTML = `
    <span class="dot" aria-hidden="true"></span>
    <div class="body">
      <p class="message">${escapeHtml(note.message)}</p>
      <p class="meta"><span class="type">${note.broadcast ? 'broadcast' : note.type}</span>
        <time datetime="${note.created_at}">${timeAgo(note.created_at)}</time>${extras}</p>
    </div>
    ${note.broadcast ? '' : '<button class="ghost mark" title="Mark read">Mark read</button><button class="ghost delete" title="Delete">Delete</button>'}`;
  const button = li.querySelector('.mark');
  if (button) {
    button.disabled = !!note.read;
    button.addEventListener('click', async () => {
      await client.markRead([note.id]);
      markDom([note.id]);
    });
  }
  const remove = li.querySelector('.delete');
  if (remove) {
    remove.addEventListener('click', async () => {
      const resp = await fetch(`/api/users/${encodeURIComponent(client.userId)}/notifications/${encodeURIComponent(note.id)}`, {
        method: 'DELETE',
        headers: { Authorization: `Bearer ${client.token}` },
      });
      if (resp.ok || resp.status === 404) removeDom([note.id]);
    });
  }
  const list = $('#list');
  if (prepend) list.prepend(li);
  else list.append(li);
  $('#empty').hidden = true;
}

function markDom(ids) {
  const nodes = ids === 'all' ? document.querySelectorAll('.notification.unread')
    : ids.map((id) => document.querySelector(`.notification[data-id="${CSS.escape(id)}"]`)).filter(Boolean);
  for (const node of nodes) {
    node.classList.remove('unread');
    const button = node.querySelector('.mark');
    if (button) button.disabled = true;
  }
}

function removeDom(ids) {
  const nodes = ids === 'all' ? document.querySelectorAll('.notification:not(.broadcast)')
    : ids.map((id) => document.querySelector(`.notification[data-id="${CSS.escape(id)}"]`)).filter(Boolean);
  for (const node of nodes) node.remove();
  $('#empty').hidden = document.querySelector('.notification') !== null;
}

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);
}

async function connect(userId) {
  if (client) client.close();
  room = null;
  $('#list').innerHTML = '';
  $('#empty').hidden = false;
  $('#who').textContent = `· ${userId}`;
  $('#user').value = userId;
  const backoff = Number(params.get('backoff')) || 500;
  client = new RTClient({ url: wsUrl, getToken: () => mint(userId), backoffBase: backoff, backoffMax: backoff * 8 });
  window.rt = client; // for the console (and the browser tests)
  client.on('connect', async () => {
    setStatus('open', 'live');
    $('#mark-all').disabled = false;
    const history = await client.getNotifications({ limit: 50 });
    for (const note of history.reverse()) render(note);
  });
  client.on('disconnect', () => setStatus('closed', 'reconnecting…'));
  client.on('reconnecting', ({ delay }) => setStatus('closed', `reconnecting in ${(delay / 1000).toFixed(1)} s`));
  client.on('notification', (note) => render(note));
  client.on('unread', setBadge);
  client.on('read', (push) => markDom(push.all ? 'all' : push.ids));
  client.on('deleted', (push) => removeDom(push.all ? 'all' : push.ids));
  setStatus('connecting', 'connecting…');
  try {
    await client.connect();
  } catch (err) {
    setStatus('closed', `error: ${err.message}`);
  }
}

// -- the case room: a topic per case, with presence -------------------------

let room = null;
const people = new Map(); // user_id -> Set of session ids

function showPeople() {
  const names = [...people.keys()].sort();
  $('#room-people').textContent = names.length ? names.join(', ') : 'nobody yet';
}

function logRoom(text, kind = 'status') {
  const li = document.createElement('li');
  li.className = `room-${kind}`;
  li.textContent = text;
  $('#room-log').prepend(li);
}

async function enterRoom(topic) {
  if (!client) return;
  if (room) await room.unsubscribe();
  people.clear();
  $('#room-log').innerHTML = '';
  room = client.subscribe(topic, (p) => logRoom(`${p.data.status || JSON.stringify(p.data)}`), { presence: true });
  window.room = room; // for the browser tests
  room.onJoin((who) => {
    if (!people.has(who.user_id)) logRoom(`${who.user_id} came in`, 'presence');
    people.set(who.user_id, (people.get(who.user_id) || new Set()).add(who.session_id));
    showPeople();
  });
  room.onLeave((who) => {
    const sessions = people.get(who.user_id);
    if (sessions) sessions.delete(who.session_id);
    if (sessions && sessions.size === 0) {
      people.delete(who.user_id);
      logRoom(`${who.user_id} left`, 'presence');
    }
    showPeople();
  });
  try {
    await room.ready;
    const here = await room.presence();
    for (const u of here.users) people.set(u.user_id, new Set(u.sessions));
    showPeople();
  } catch (err) {
    logRoom(`cannot enter: ${err.message}`, 'presence');
  }
}

$('#room-pick').addEventListener('submit', (event) => {
  event.preventDefault();
  enterRoom(new FormData(event.target).get('case'));
});

$('#case-status').addEventListener('submit', async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  try {
    const result = await adminPost(`/api/topics/${encodeURIComponent(form.get('case'))}/publications`, {
      status: form.get('status'),
    });
    $('#panel-result').textContent = `Published to ${form.get('case')}: ${result.delivered} subscriber(s) here.`;
  } catch (err) {
    $('#panel-result').textContent = `Not published: ${err.message}`;
  }
});

$('#login').addEventListener('submit', (event) => {
  event.preventDefault();
  const userId = $('#user').value.trim();
  if (userId) {
    history.replaceState(null, '', `?user=${encodeURIComponent(userId)}`);
    connect(userId);
  }
});

$('#mark-all').addEventListener('click', async () => {
  await client.markRead('all');
  markDom('all');
});

async function adminPost(path, body) {
  const token = await mint('demo-admin', 'admin');
  const resp = await fetch(path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${token}` },
    body: JSON.stringify(body),
  });
  const data = await resp.json();
  if (!resp.ok) throw new Error(data.error ? data.error.message : `HTTP ${resp.status}`);
  return data;
}

$('#send').addEventListener('submit', async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  const body = { message: form.get('message'), type: form.get('type') };
  if (form.get('category')) body.category = form.get('category');
  try {
    const result = await adminPost(`/api/notifications/${encodeURIComponent(form.get('to'))}`, body);
    $('#panel-result').textContent = `Sent to ${form.get('to')}: ${result.delivered} live session(s), stored for later.`;
  } catch (err) {
    $('#panel-result').textContent = `Not sent: ${err.message}`;
  }
});

$('#broadcast').addEventListener('submit', async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  try {
    const result = await adminPost('/api/broadcast', { message: form.get('message'), type: form.get('type') });
    $('#panel-result').textContent = `Broadcast reached ${result.delivered} session(s).`;
  } catch (err) {
    $('#panel-result').textContent = `Not sent: ${err.message}`;
  }
});

setInterval(() => {
  for (const t of document.querySelectorAll('time[datetime]')) t.textContent = timeAgo(t.getAttribute('datetime'));
}, 30000);

if (params.get('user')) connect(params.get('user'));
