// rtclient.js: a dependency-free browser client for rtserver (ES module).
//
//   import { initializeSocket, addSocketEventHandler, markRead } from '/static/rtclient.js';
//   await initializeSocket({ url: 'wss://rt.example.com/ws', getToken: fetchToken });
//   addSocketEventHandler('notification', (n) => showNotification(n));
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
}

// -- the functional API (the names of the module rtserver replaces) ----------------------------------------------

let current = null;

/** Connect (options: {url, token | getToken, ...}) and register; resolves with the client. */
export async function initializeSocket(options) {
  if (current) current.close();
  current = new RTClient(options);
  await current.connect();
  return current;
}

function client() {
  if (!current) throw new Error('rtclient: call initializeSocket first');
  return current;
}

export function addSocketEventHandler(event, callback) {
  return client().on(event, callback);
}

export function removeSocketEventHandler(event, callback) {
  client().off(event, callback);
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
