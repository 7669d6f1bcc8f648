import net from 'node:net';

/** A raw TCP connection to a test server, for requests no HTTP client would send. */
export interface RawConnection {
  socket: net.Socket;
  /** Everything received so far. */
  received(): string;
  /** Resolves with everything received once the server has closed the connection. */
  closed: Promise<string>;
}

export function connectRaw(baseUrl: string): Promise<RawConnection> {
  const { hostname, port } = new URL(baseUrl);
  return new Promise((resolve, reject) => {
    const socket = net.connect(Number(port), hostname);
    let got = '';
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => (got += d));
    // a reset after the server answered is still a close
    socket.on('error', () => undefined);
    const closed = new Promise<string>((done) => socket.once('close', () => done(got)));
    socket.once('connect', () => resolve({ socket, received: () => got, closed }));
    socket.once('error', reject);
  });
}

/** Writes `text` one character per `everyMs` until the socket closes; returns a stop function. */
export function drip(socket: net.Socket, text: string, everyMs: number): () => void {
  let i = 0;
  const timer = setInterval(() => {
    if (socket.destroyed || i >= text.length) return clearInterval(timer);
    socket.write(text[i++]);
  }, everyMs);
  return () => clearInterval(timer);
}

/** The status and JSON body of the first HTTP response in `raw`. */
export function parseRawResponse(raw: string): { status: number; headers: string; body: unknown } {
  const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(raw)?.[1]);
  const split = raw.indexOf('\r\n\r\n');
  const body = split >= 0 ? raw.slice(split + 4) : '';
  let json: unknown;
  try {
    json = JSON.parse(body);
  } catch {
    json = body;
  }
  return { status, headers: split >= 0 ? raw.slice(0, split) : raw, body: json };
}
