// rtclient.js: a dependency-free browser client for rtserver (ES module).
//
//   import { initializeSocket, addSocketEventHandler, subscribe } from '/static/rtclient.js';
//   addSocketEventHandler('notification', (n) => showNotification(n));
//   const room = subscribe('case:881', (p) => showStatus(p.data), { presence: true });
//   await initializeSocket({ url: 'wss://rt.example.com/ws', getToken: fetchToken });
//
// Handlers and subscriptions may be added before initializeSocket: they are
// kept and attached when it runs. Topic subscriptions come back by themselves
// after a reconnect, resuming from the last publication seen.
//
// Requests are promises matched to acks by id, with timeouts. The connection
// comes back by itself (exponential backoff with full jitter, or the server's
// reconnect hint at shutdown) and resumes with last_id, so nothing is missed.
// Receipts are sent by themselves and duplicate ids are dropped. A fresh token
// is fetched through getToken when the old one is about to expire.

const DEFAULTS = {
  requestTimeout: 10000, // ms per request
  backoffBase: 500, // ms: first reconnect delay ceiling
  backoffMax: 30000, // ms: largest reconnect delay ceiling
  receipts: true,
  seenLimit: 5000, // ids remembered for dropping duplicates
};

export class RTClientError extends Error {
  constructor(code, message, data) {
    super(`${code}: ${message}`);
    this.code = code;
    this.data = data || {};
  }
}

export class RTClient {
  constructor(options) {
    if (!options || !options.url) throw new TypeError('initializeSocket: url is required');
    if (!options.token && !options.getToken) throw new TypeError('initializeSocket: token or getToken is required');
    this.options = { ...DEFAULTS, ...options };
    this.handlers = new Map();
    this.pending = new Map();
    this.nextId = 1;
    this.ws = null;
    this.state = 'idle';
    this.userId = null;
    this.sessionId = null;
    this.unreadCount = 0;
    this.lastId = options.lastId || null;
    this.token = options.token || null;
    this.attempt = 0;
    this.seen = new Set();
    this.toConfirm = [];
    this.reconnectTimer = null;
    this.closedByUser = false;
    this._ready = null;
    this.subscriptions = new Map(); // topic -> Subscription
  }

  // -- events ---------------------------------------------------------------

  on(event, callback) {
    if (!this.handlers.has(event)) this.handlers.set(event, new Set());
    this.handlers.get(event).add(callback);
    return () => this.off(event, callback);
  }

  off(event, callback) {
    const set = this.handlers.get(event);
    if (set) set.delete(callback);
  }

  emit(event, payload) {
    const set = this.handlers.get(event);
    if (!set) return;
    for (const callback of [...set]) {
      try {
        callback(payload);
      } catch (err) {
        console.error(`rtclient: a '${event}' handler failed`, err);
      }
    }
  }

  // -- connection -----------------------------------------------------------

  /** Connect and register; resolves with the register ack. */
  connect() {
    this.closedByUser = false;
    if (!this._ready) this._ready = this._open();
    return this._ready;
  }

  async _freshToken() {
    if (this.options.getToken) this.token = await this.options.getToken();
    return this.token;
  }

  _open() {
    return new Promise((resolve, reject) => {
      this.state = 'connecting';
      let ws;
      try {
        ws = new WebSocket(this.options.url);
      } catch (err) {
        reject(err);
        this._scheduleReconnect();
        return;
      }
      this.ws = ws;
      let registered = false;
      ws.onopen = async () => {
        try {
          const token = this.token && !this._tokenStale ? this.token : await this._freshToken();
          this._tokenStale = false;
          const data = { token };
          if (this.lastId) data.last_id = this.lastId;
          if (this.options.receipts) data.receipts = true;
          const ack = await this.request('register', data);
          registered = true;
          this.attempt = 0;
          this.state = 'open';
          this.userId = ack.user_id;
          this.sessionId = ack.session_id;
          if (typeof ack.unread_count === 'number') this._setUnread(ack.unread_count);
          for (const sub of this.subscriptions.values()) sub._send();
          this.emit('connect', ack);
          resolve(ack);
        } catch (err) {
          this.emit('error', err);
          if (err.code === 'unauthorized') this._tokenStale = true;
          reject(err);
          ws.close();
        }
      };
      ws.onmessage = (event) => this._onFrame(event.data);
      ws.onclose = (event) => {
        this.state = 'closed';
        for (const [, entry] of this.pending) {
          clearTimeout(entry.timer);
          entry.reject(new RTClientError('disconnected', 'the connection closed'));
        }
        this.pending.clear();
        this.emit('disconnect', { code: event.code, reason: event.reason });
        if (!registered) reject(new RTClientError('disconnected', `closed before register (${event.code})`));
        this._ready = null;
        if (event.code === 1008 && /token/.test(event.reason || '')) this._tokenStale = true;
        if (!this.closedByUser) this._scheduleReconnect(event);
      };
    });
  }

  _scheduleReconnect(event) {
    if (this.closedByUser || this.reconnectTimer) return;
    const hint = event && /reconnect_after_ms=(\d+)/.exec(event.reason || '');
    let delay;
    if (hint) {
      delay = Number(hint[1]);
    } else {
      const ceiling = Math.min(this.options.backoffMax, this.options.backoffBase * 2 ** this.attempt);
      delay = Math.random() * ceiling; // full jitter
    }
    this.attempt += 1;
    this.emit('reconnecting', { delay, attempt: this.attempt });
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      this.connect().catch(() => {}); // the close handler schedules the next try
    }, delay);
  }

  /** Close for good (no reconnect). */
  close() {
    this.closedByUser = true;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    if (this.ws) this.ws.close(1000, 'client closed');
  }

  // -- frames ---------------------------------------------------------------

  _onFrame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    if (frame.id !== undefined && this.pending.has(frame.id)) {
      const entry = this.pending.get(frame.id);
      this.pending.delete(frame.id);
      clearTimeout(entry.timer);
      if (frame.event === 'error') {
        entry.reject(new RTClientError(frame.data.code, frame.data.message, frame.data));
      } else {
        entry.resolve(frame.data || {});
      }
      return;
    }
    const data = frame.data || {};
    switch (frame.event) {
      case 'notification':
        this._onNotification(data);
        break;
      case 'read':
        if (typeof data.unread_count === 'number') this._setUnread(data.unread_count);
        this.emit('read', data);
        break;
      case 'publication': {
        const sub = this.subscriptions.get(data.topic);
        if (sub) sub._publication(data);
        break;
      }
      case 'join':
      case 'leave': {
        const sub = this.subscriptions.get(data.topic);
        if (sub) sub._emit(frame.event, data);
        break;
      }
      case 'deleted':
        // Removed through the HTTP API (a delete button, an erasure request).
        if (typeof data.unread_count === 'number') this._setUnread(data.unread_count);
        this.emit('deleted', data);
        break;
      case 'token_expiring':
        this.emit('token_expiring', data);
        this._refresh();
        break;
      case 'error':
        this.emit('error', new RTClientError(data.code, data.message, data));
        break;
      default:
        this.emit(frame.event, data);
    }
  }

  _onNotification(note) {
    if (!note.broadcast && note.id) {
      if (this.options.receipts) this._confirm(note.id);
      if (this.seen.has(note.id)) return; // a duplicate of at-least-once delivery
      this.seen.add(note.id);
      if (this.seen.size > this.options.seenLimit) this.seen.delete(this.seen.values().next().value);
      if (!this.lastId || note.id > this.lastId) this.lastId = note.id;
      // Replayed ones were already counted in the register ack's unread_count.
      if (!note.read && !note.replayed) this._setUnread(this.unreadCount + 1);
    }
    this.emit('notification', note);
  }

  _confirm(id) {
    if (this.toConfirm.length === 0) {
      setTimeout(() => {
        const ids = this.toConfirm;
        this.toConfirm = [];
        this.send('received', { ids });
      }, 0);
    }
    this.toConfirm.push(id);
  }

  async _refresh() {
    if (!this.options.getToken) return;
    try {
      const token = await this._freshToken();
      await this.request('refresh', { token });
    } catch (err) {
      this.emit('error', err);
    }
  }

  _setUnread(count) {
    this.unreadCount = Math.max(0, count);
    this.emit('unread', this.unreadCount);
  }

  /** Send a frame without an id (no reply). */
  send(event, data) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify({ event, data: data || {} }));
    return true;
  }

  /** Send a frame and resolve with its ack's data (or reject with RTClientError). */
  request(event, data, { timeout } = {}) {
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
        reject(new RTClientError('disconnected', 'not connected'));
        return;
      }
      const id = this.nextId++;
      const ms = timeout || this.options.requestTimeout;
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new RTClientError('timeout', `no reply to '${event}' within ${ms} ms`));
      }, ms);
      this.pending.set(id, { resolve, reject, timer });
      this.ws.send(JSON.stringify({ event, data: data || {}, id }));
    });
  }

  // -- operations -----------------------------------------------------------

  /** Mark ids read, or everything with 'all'. */
  async markRead(ids) {
    const ack = await this.request('mark_read', ids === 'all' ? { all: true } : { ids });
    this._setUnread(ack.unread_count);
    return ack;
  }

  /** History, newest first: {unread_only, limit, before}. */
  async getNotifications(options) {
    const ack = await this.request('get_notifications', options || {});
    return ack.notifications;
  }

  /**
   * Subscribe to a topic: handler(publication) gets each {topic, id, data,
   * created_at, publisher?}. Options: {presence: true} for join/leave
   * (sub.onJoin, sub.onLeave), lastId to resume from. Returns a Subscription
   * at once; sub.ready resolves with the ack once the server has it.
   */
  subscribe(topic, handler, options = {}) {
    return this._adopt(new Subscription(null, topic, handler, options));
  }

  _adopt(sub) {
    if (this.subscriptions.has(sub.topic)) throw new Error(`rtclient: already subscribed to ${sub.topic}`);
    sub.client = this;
    this.subscriptions.set(sub.topic, sub);
    if (this.state === 'open') sub._send();
    return sub;
  }
}

/** One topic subscription of an RTClient; resubscribes after reconnects. */
export class Subscription {
  constructor(client, topic, handler, options) {
    this.client = client;
    this.topic = topic;
    this.presenceEvents = Boolean(options.presence);
    this.lastId = options.lastId || null;
    this.recovered = null;
    this.handlers = { publication: new Set(handler ? [handler] : []), join: new Set(), leave: new Set() };
    this.active = true;
    this.ready = new Promise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
    this.ready.catch(() => {}); // a refusal also goes to 'error' handlers
  }

  _send() {
    if (!this.active) return;
    const data = { topic: this.topic };
    if (this.lastId) data.last_id = this.lastId;
    if (this.presenceEvents) data.presence = true;
    this.client.request('subscribe', data).then(
      (ack) => {
        if (!this.lastId) this.lastId = ack.position; // nothing seen yet: resume from here
        this.recovered = ack.recovered === undefined ? null : ack.recovered;
        this._resolveReady(ack);
        this.client.emit('subscribed', ack);
      },
      (err) => {
        if (err.code === 'disconnected') return; // sent again after the reconnect
        this.active = false;
        this.client.subscriptions.delete(this.topic);
        this._rejectReady(err);
        this.client.emit('error', err);
      },
    );
  }

  _publication(pub) {
    if (this.lastId && pub.id <= this.lastId) return; // had it already
    this.lastId = pub.id;
    this._emit('publication', pub);
  }

  _emit(kind, payload) {
    for (const callback of [...this.handlers[kind]]) {
      try {
        callback(payload);
      } catch (err) {
        console.error(`rtclient: a '${kind}' handler of ${this.topic} failed`, err);
      }
    }
  }

  onPublication(callback) {
    this.handlers.publication.add(callback);
    return () => this.handlers.publication.delete(callback);
  }

  onJoin(callback) {
    this.handlers.join.add(callback);
    return () => this.handlers.join.delete(callback);
  }

  onLeave(callback) {
    this.handlers.leave.add(callback);
    return () => this.handlers.leave.delete(callback);
  }

  _bound() {
    if (!this.client) throw new Error('rtclient: call initializeSocket first');
    return this.client;
  }

  /** Who is here: {topic, users: [{user_id, sessions}], count}. */
  presence() {
    return this._bound().request('presence', { topic: this.topic });
  }

  /** Publish to the topic (the token must grant it); resolves with the id. */
  async publish(data) {
    const ack = await this._bound().request('publish', { topic: this.topic, data });
    return ack.id;
  }

  async unsubscribe() {
    if (!this.active) return;
    this.active = false;
    early.subscriptions = early.subscriptions.filter((s) => s !== this);
    if (!this.client) return;
    this.client.subscriptions.delete(this.topic);
    if (this.client.state === 'open') await this.client.request('unsubscribe', { topic: this.topic });
  }
}

// -- the functional API (the names of the module rtserver replaces) ----------------------------------------------

let current = null;
// Handlers and subscriptions made before initializeSocket, attached when it runs.
const early = { handlers: [], subscriptions: [] };

/** Connect (options: {url, token | getToken, ...}) and register; resolves with the client. */
export async function initializeSocket(options) {
  const previous = current;
  current = new RTClient(options);
  if (previous) {
    previous.close();
    for (const [event, set] of previous.handlers) for (const callback of set) current.on(event, callback);
    for (const sub of previous.subscriptions.values()) current._adopt(sub);
  }
  for (const [event, callback] of early.handlers) current.on(event, callback);
  early.handlers = [];
  for (const sub of early.subscriptions) current._adopt(sub);
  early.subscriptions = [];
  await current.connect();
  return current;
}

export function addSocketEventHandler(event, callback) {
  if (current) return current.on(event, callback);
  const entry = [event, callback];
  early.handlers.push(entry);
  return () => {
    early.handlers = early.handlers.filter((e) => e !== entry);
    if (current) current.off(event, callback);
  };
}

export function removeSocketEventHandler(event, callback) {
  early.handlers = early.handlers.filter(([e, c]) => e !== event || c !== callback);
  if (current) current.off(event, callback);
}

/** Subscribe to a topic (see RTClient.subscribe); also before initializeSocket. */
export function subscribe(topic, handler, options) {
  if (current) return current.subscribe(topic, handler, options);
  const sub = new Subscription(null, topic, handler, options || {});
  early.subscriptions.push(sub);
  return sub;
}

function client() {
  if (!current) throw new Error('rtclient: call initializeSocket first');
  return current;
}

export function markRead(ids) {
  return client().markRead(ids);
}

export function getNotifications(options) {
  return client().getNotifications(options);
}

export function closeSocket() {
  if (current) current.close();
  current = null;
}
