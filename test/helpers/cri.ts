/**
 * A minimal client for the Kubernetes Container Runtime Interface (CRI, gRPC package `runtime.v1`)
 * as containerd's CRI plugin serves it on containerd's main socket: what a kubelet would call,
 * without a kubelet. Messages come from the project's own subset of the API,
 * test/fixtures/cri/runtime-v1.proto, encoded with protobufjs; the transport is @grpc/grpc-js.
 *
 * ```ts
 * const cri = new CriClient(ctrd.socket);
 * const { pod_sandbox_id } = await cri.runtime('RunPodSandbox', { config, runtime_handler: 'kata' });
 * cri.close();
 * ```
 * Requests and answers are plain objects with the .proto's snake_case field names; enums are their
 * names (`'CONTAINER_RUNNING'`), 64-bit integers are numbers, and absent fields have their defaults.
 *
 * Streamed calls (Exec, Attach) answer with a URL of containerd's streaming server;
 * {@link CriExecStream} connects to it as kubectl does through the kubelet.
 */
import path from 'node:path';
import { credentials, Client, type ServiceError } from '@grpc/grpc-js';
import protobuf from 'protobufjs';
import WebSocket from 'ws';
import { PACKAGE_ROOT } from '../../core/paths.js';

export const CRI_PROTO = path.join(PACKAGE_ROOT, 'test', 'fixtures', 'cri', 'runtime-v1.proto');

type Message = Record<string, unknown>;

let root: protobuf.Root | undefined;

export class CriClient {
  readonly #client: Client;

  constructor(socket: string) {
    root ??= new protobuf.Root().loadSync(CRI_PROTO, { keepCase: true });
    this.#client = new Client(`unix://${socket}`, credentials.createInsecure());
  }

  /** A `runtime.v1.RuntimeService` call. */
  runtime(method: string, request: Message, timeoutMs?: number): Promise<Message> {
    return this.#call('RuntimeService', method, request, timeoutMs);
  }

  /** A `runtime.v1.ImageService` call. */
  image(method: string, request: Message, timeoutMs?: number): Promise<Message> {
    return this.#call('ImageService', method, request, timeoutMs);
  }

  close(): void {
    this.#client.close();
  }

  #call(service: string, method: string, request: Message, timeoutMs = 120_000): Promise<Message> {
    const rpc = root!.lookupService(`runtime.v1.${service}`).methods[method];
    if (!rpc) throw new Error(`runtime.v1.${service} has no method ${method} in ${CRI_PROTO}`);
    const req = root!.lookupType(rpc.requestType);
    const res = root!.lookupType(rpc.responseType);
    return new Promise((resolve, reject) => {
      this.#client.makeUnaryRequest(
        `/runtime.v1.${service}/${method}`,
        (m: Message) => Buffer.from(req.encode(req.fromObject(m)).finish()),
        (b: Buffer) => res.toObject(res.decode(b), { longs: Number, enums: String, defaults: true }) as Message,
        request,
        { deadline: Date.now() + timeoutMs },
        (e: ServiceError | null, answer?: Message) => (e ? reject(new Error(`CRI ${method}: ${e.details || e.message}`)) : resolve(answer!)),
      );
    });
  }
}

/**
 * The status containerd's streaming server sends on channel 3 when the command ends: a Kubernetes
 * `metav1.Status`; `Success`, or `Failure` with reason `NonZeroExitCode` and the exit code as the
 * message of the cause of type `ExitCode`.
 */
export interface StreamStatus {
  status: string;
  reason?: string;
  message?: string;
  details?: { causes?: { reason?: string; message?: string }[] };
}

/** The `remotecommand` WebSocket subprotocol: binary frames, each led by its channel byte. */
export const STREAM_PROTOCOL = 'v4.channel.k8s.io';
/** The channels of {@link STREAM_PROTOCOL} (k8s.io/apiserver wsstream, as vendored by containerd 1.6). */
export const StreamChannel = { Stdin: 0, Stdout: 1, Stderr: 2, Status: 3, Resize: 4 } as const;

/**
 * A client of an exec or attach streaming endpoint (the URL Exec or Attach answers), over WebSocket with the
 * `v4.channel.k8s.io` subprotocol as kubectl speaks it: stdin, a terminal's size (JSON
 * `{"Width","Height"}`) and output travel as binary frames whose first byte is the channel. The
 * endpoint's token is good for one connection.
 */
export class CriExecStream {
  /** Everything received on stdout (a terminal's only output stream) and stderr, as text. */
  stdout = '';
  stderr = '';
  /** Resolves with the status frame (channel 3), or rejects if the connection ends without one. */
  readonly status: Promise<StreamStatus>;
  /** Resolves once the server closed the connection (it does after the status). */
  readonly closed: Promise<void>;
  readonly #ws: WebSocket;
  #onData = (): void => {};

  private constructor(ws: WebSocket) {
    this.#ws = ws;
    let gotStatus: (s: StreamStatus) => void = () => {};
    let noStatus: (e: Error) => void = () => {};
    this.status = new Promise((resolve, reject) => {
      gotStatus = resolve;
      noStatus = reject;
    });
    this.status.catch(() => {});
    ws.on('message', (data: Buffer) => {
      if (data.length === 0) return;
      const body = data.subarray(1);
      switch (data[0]) {
        case StreamChannel.Stdout:
          this.stdout += body.toString('utf8');
          break;
        case StreamChannel.Stderr:
          this.stderr += body.toString('utf8');
          break;
        case StreamChannel.Status:
          if (body.length > 0) gotStatus(JSON.parse(body.toString('utf8')) as StreamStatus);
          break;
      }
      this.#onData();
    });
    this.closed = new Promise((resolve) => ws.on('close', () => resolve()));
    void this.closed.then(() => noStatus(new Error(`the stream closed without a status; stdout so far: ${JSON.stringify(this.stdout)}`)));
  }

  /** Connects to `url` (http://… as Exec answers it) and resolves once the upgrade succeeded. */
  static open(url: string, timeoutMs = 30_000): Promise<CriExecStream> {
    const ws = new WebSocket(url, [STREAM_PROTOCOL], { handshakeTimeout: timeoutMs });
    return new Promise((resolve, reject) => {
      ws.once('error', reject);
      ws.once('open', () => {
        ws.off('error', reject);
        ws.on('error', () => {});
        if (ws.protocol !== STREAM_PROTOCOL) reject(new Error(`the server chose subprotocol ${JSON.stringify(ws.protocol)}`));
        else resolve(new CriExecStream(ws));
      });
    });
  }

  /** Sends keys (or any bytes) to the process's stdin. */
  write(data: string | Buffer): void {
    this.#send(StreamChannel.Stdin, typeof data === 'string' ? Buffer.from(data) : data);
  }

  /** Tells the server the client's terminal now has `width` columns and `height` rows. */
  resize(width: number, height: number): void {
    this.#send(StreamChannel.Resize, Buffer.from(JSON.stringify({ Width: width, Height: height })));
  }

  /** Resolves once stdout matches `re` (with the match), or rejects after `timeoutMs`. */
  waitFor(re: RegExp, timeoutMs = 30_000): Promise<RegExpMatchArray> {
    return new Promise((resolve, reject) => {
      const check = () => {
        const m = this.stdout.match(re);
        if (m) {
          clearTimeout(timer);
          this.#onData = () => {};
          resolve(m);
        }
      };
      const timer = setTimeout(() => {
        this.#onData = () => {};
        reject(new Error(`stdout did not match ${re} within ${timeoutMs} ms; it is ${JSON.stringify(this.stdout)}`));
      }, timeoutMs);
      this.#onData = check;
      check();
    });
  }

  /** Closes the connection from the client's side (as a client going away does). */
  close(): void {
    this.#ws.close();
  }

  #send(channel: number, body: Buffer): void {
    this.#ws.send(Buffer.concat([Buffer.from([channel]), body]), { binary: true });
  }
}

/** The exit code a stream's status carries: 0 for Success, the `ExitCode` cause for NonZeroExitCode. */
export function exitCodeOf(status: StreamStatus): number {
  if (status.status === 'Success') return 0;
  const cause = status.details?.causes?.find((c) => c.reason === 'ExitCode');
  if (status.reason !== 'NonZeroExitCode' || cause?.message === undefined) throw new Error(`no exit code in the status ${JSON.stringify(status)}`);
  return Number(cause.message);
}
