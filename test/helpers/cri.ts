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
 */
import path from 'node:path';
import { credentials, Client, type ServiceError } from '@grpc/grpc-js';
import protobuf from 'protobufjs';
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
