/**
 * Generates TypeScript protobuf modules from the .proto files in protos/: for every message an
 * interface plus a codec (encode/decode written out field by field, on protobufjs's `minimal`
 * wire primitives), for every enum a table of values, for every service a descriptor that the
 * ttrpc client and server take. protobufjs parses the .proto files here, at generation time only;
 * at run time nothing is parsed, reflected or compiled with `new Function`, which keeps start-up
 * (the shim, `kata-runtime run`, and the guest agent under TCG) fast: see bench/ttrpc.ts.
 *
 * The output is committed (like core/config/schema-types.ts); `npm run gen` rewrites it and a unit
 * test fails when it differs from a fresh generation.
 *
 * Supported: proto3 scalars, enums, nested messages, repeated (packed and not), map<string, V>,
 * unary rpcs. Not needed by our protos and refused: oneof, proto2 groups/defaults, streaming rpcs.
 */
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import protobuf from 'protobufjs';
import { PACKAGE_ROOT } from '../core/paths.js';

export const PROTOS_DIR = path.join(PACKAGE_ROOT, 'protos');

export interface ProtoModule {
  /** Output file, relative to the package root. */
  readonly out: string;
  /** Entry .proto files, relative to protos/; what they import is generated too. */
  readonly protos: readonly string[];
  /** Import specifier of wire/ttrpc/codec.ts as seen from the output file. */
  readonly codecImport: string;
}

export const PROTO_MODULES: readonly ProtoModule[] = [
  { out: 'wire/ttrpc/proto.gen.ts', protos: ['ttrpc/request.proto'], codecImport: './codec.js' },
  { out: 'wire/agent/proto.gen.ts', protos: ['kata/agent.proto', 'kata/health.proto'], codecImport: '../ttrpc/codec.js' },
  {
    out: 'wire/containerd/proto.gen.ts',
    protos: ['containerd/task/v2/shim.proto', 'containerd/events/task.proto', 'containerd/services/ttrpc/events/v1/events.proto', 'containerd/runtimeoptions/v1/options.proto', 'containerd/types/introspection.proto', 'containerd/cgroups/v2/metrics.proto'],
    codecImport: '../ttrpc/codec.js',
  },
];

interface ScalarInfo {
  /** TypeScript type of a decoded value. */
  readonly ts: string;
  readonly wire: number;
  /** protobufjs Reader/Writer method. */
  readonly rw: string;
  /** 64-bit: converted between bigint and protobufjs's Long. */
  readonly long?: 'signed' | 'unsigned';
  readonly zero: string;
}

const SCALARS: Record<string, ScalarInfo> = {
  double: { ts: 'number', wire: 1, rw: 'double', zero: '0' },
  float: { ts: 'number', wire: 5, rw: 'float', zero: '0' },
  int32: { ts: 'number', wire: 0, rw: 'int32', zero: '0' },
  uint32: { ts: 'number', wire: 0, rw: 'uint32', zero: '0' },
  sint32: { ts: 'number', wire: 0, rw: 'sint32', zero: '0' },
  fixed32: { ts: 'number', wire: 5, rw: 'fixed32', zero: '0' },
  sfixed32: { ts: 'number', wire: 5, rw: 'sfixed32', zero: '0' },
  int64: { ts: 'bigint', wire: 0, rw: 'int64', long: 'signed', zero: '0n' },
  uint64: { ts: 'bigint', wire: 0, rw: 'uint64', long: 'unsigned', zero: '0n' },
  sint64: { ts: 'bigint', wire: 0, rw: 'sint64', long: 'signed', zero: '0n' },
  fixed64: { ts: 'bigint', wire: 1, rw: 'fixed64', long: 'unsigned', zero: '0n' },
  sfixed64: { ts: 'bigint', wire: 1, rw: 'sfixed64', long: 'signed', zero: '0n' },
  bool: { ts: 'boolean', wire: 0, rw: 'bool', zero: 'false' },
  string: { ts: 'string', wire: 2, rw: 'string', zero: "''" },
  bytes: { ts: 'Uint8Array', wire: 2, rw: 'bytes', zero: 'new Uint8Array(0)' },
};
const ENUM_INFO: ScalarInfo = { ts: 'number', wire: 0, rw: 'int32', zero: '0' };

/** Loads the entry files with their imports; `google/protobuf/*` comes from protobufjs's bundled copies. */
export function loadProtos(files: readonly string[]): protobuf.Root {
  const root = new protobuf.Root();
  root.resolvePath = (_origin, target) => (target.startsWith('google/protobuf/') ? target : path.join(PROTOS_DIR, target));
  root.loadSync([...files], { alternateCommentMode: true });
  root.resolveAll();
  return root;
}

export function generateProtoModule(mod: ProtoModule): string {
  return new ModuleWriter(mod, loadProtos(mod.protos)).write();
}

export function generateAllProtoModules(): Map<string, string> {
  return new Map(PROTO_MODULES.map((m) => [m.out, generateProtoModule(m)]));
}

function q(s: string): string {
  return `'${s.replace(/\\/g, '\\\\').replace(/'/g, "\\'")}'`;
}

function doc(comment: string | null | undefined, indent = ''): string {
  if (!comment) return '';
  const lines = comment.trim().split('\n').map((l) => l.replace(/\*\//g, '*\\/'));
  if (lines.length === 1) return `${indent}/** ${lines[0]} */\n`;
  return `${indent}/**\n${lines.map((l) => `${indent} *${l ? ` ${l}` : ''}`).join('\n')}\n${indent} */\n`;
}

function joinDoc(comment: string | null | undefined, label: string): string {
  return comment ? `${comment.trim()}\n\n${label}` : label;
}

class ModuleWriter {
  private readonly used = new Set<string>();
  private readonly names = new Map<string, string>();
  private readonly types: protobuf.Type[] = [];
  private readonly enums: protobuf.Enum[] = [];
  private readonly services: protobuf.Service[] = [];

  constructor(
    private readonly mod: ProtoModule,
    root: protobuf.Root,
  ) {
    this.collect(root);
    for (const t of [...this.types, ...this.enums, ...this.services]) {
      const name = this.tsName(t);
      const prev = this.names.get(name);
      if (prev) throw new Error(`${t.fullName} and ${prev} would both be called ${name} in ${mod.out}`);
      this.names.set(name, t.fullName);
    }
  }

  private collect(ns: protobuf.NamespaceBase): void {
    for (const o of ns.nestedArray) {
      if (o instanceof protobuf.Type) this.types.push(o);
      else if (o instanceof protobuf.Enum) this.enums.push(o);
      else if (o instanceof protobuf.Service) this.services.push(o);
      if (o instanceof protobuf.Namespace || o instanceof protobuf.Type) this.collect(o);
    }
  }

  /** A message nested in another is `Outer_Inner`; package names are dropped. */
  private tsName(o: protobuf.ReflectionObject): string {
    let name = o.name;
    for (let p = o.parent; p instanceof protobuf.Type; p = p.parent) name = `${p.name}_${name}`;
    return name;
  }

  private use(...ids: string[]): void {
    for (const id of ids) this.used.add(id);
  }

  write(): string {
    const body: string[] = [];
    for (const e of this.enums) body.push(this.enumCode(e));
    for (const t of this.types) body.push(this.typeCode(t));
    for (const s of this.services) body.push(this.serviceCode(s));
    const typeOnly = new Set(['MessageCodec', 'MessageInit']);
    const values = [...this.used].filter((u) => !typeOnly.has(u)).sort();
    const types = [...this.used].filter((u) => typeOnly.has(u)).sort();
    const imports = [...values, ...types.map((t) => `type ${t}`)].join(', ');
    const files = this.mod.protos.map((p) => `protos/${p}`).join(', ');
    return (
      `// Generated by scripts/gen-protos.ts from ${files} and their imports. Do not edit: run \`npm run gen\`.\n` +
      `import { ${imports} } from '${this.mod.codecImport}';\n\n` +
      body.join('\n')
    );
  }

  private enumCode(e: protobuf.Enum): string {
    const name = this.tsName(e);
    const entries = Object.entries(e.values).map(([k, v]) => `  ${k}: ${v},`);
    return `${doc(joinDoc(e.comment, `${e.fullName.slice(1)} (an open enum: a field may hold a number not listed).`))}export const ${name} = Object.freeze({\n${entries.join('\n')}\n} as const);\n`;
  }

  private fieldInfo(f: protobuf.Field): { kind: 'scalar' | 'enum' | 'message'; info: ScalarInfo; msg?: string } {
    if (f.resolvedType instanceof protobuf.Type) return { kind: 'message', info: { ts: this.tsName(f.resolvedType), wire: 2, rw: '', zero: 'undefined' }, msg: this.tsName(f.resolvedType) };
    if (f.resolvedType instanceof protobuf.Enum) return { kind: 'enum', info: ENUM_INFO };
    const info = SCALARS[f.type];
    if (!info) throw new Error(`${f.fullName}: unsupported type ${f.type}`);
    return { kind: 'scalar', info };
  }

  private fields(t: protobuf.Type): protobuf.Field[] {
    if (t.oneofsArray.length > 0) throw new Error(`${t.fullName}: oneof is not supported by the generator`);
    return [...t.fieldsArray].sort((a, b) => a.id - b.id);
  }

  private typeCode(t: protobuf.Type): string {
    const name = this.tsName(t);
    this.use('MessageCodec', 'MessageInit', 'Reader', 'Writer', 'readTag', 'skipField', 'checkEnd');
    const fields = this.fields(t);
    const iface: string[] = [];
    const inits: string[] = [];
    const enc: string[] = [];
    const dec: string[] = [];
    for (const f of fields) {
      const fi = this.fieldInfo(f);
      const fname = f.name;
      const m = `m.${fname}`;
      const enumDoc = f.resolvedType instanceof protobuf.Enum ? `A {@link ${this.tsName(f.resolvedType)}} value.` : '';
      const comment = [f.comment ?? '', enumDoc].filter(Boolean).join('\n');
      if (f instanceof protobuf.MapField) {
        if (f.keyType !== 'string') throw new Error(`${f.fullName}: only map<string, V> is supported`);
        iface.push(`${doc(comment, '  ')}  ${fname}: Record<string, ${fi.info.ts}>;`);
        inits.push(`${fname}: {}`);
        enc.push(this.encMap(f, m, fi));
        dec.push(this.decMap(f, fi));
        continue;
      }
      if (f.repeated) {
        iface.push(`${doc(comment, '  ')}  ${fname}: ${fi.info.ts}[];`);
        inits.push(`${fname}: []`);
      } else if (fi.kind === 'message') {
        iface.push(`${doc(comment, '  ')}  ${fname}?: ${fi.info.ts};`);
        inits.push(`${fname}: undefined`);
      } else {
        iface.push(`${doc(comment, '  ')}  ${fname}: ${fi.info.ts};`);
        inits.push(`${fname}: ${fi.info.zero}`);
      }
      enc.push(this.encField(f, m, fi));
      dec.push(this.decField(f, fi));
    }
    const encParam = fields.length ? 'm' : '_m';
    const lines = [
      `${doc(joinDoc(t.comment, t.fullName.slice(1)))}`.trimEnd(),
      fields.length ? `export interface ${name} {\n${iface.join('\n')}\n}` : `export interface ${name} {}`,
      '',
      `function enc${name}(${encParam}: MessageInit<${name}>, w: Writer): Writer {`,
      ...enc,
      '  return w;',
      '}',
      '',
      `function dec${name}(r: Reader, end: number): ${name} {`,
      `  const m: ${name} = { ${inits.join(', ')} };`,
      '  while (r.pos < end) {',
      '    const tag = readTag(r);',
      '    switch (tag >>> 3) {',
      ...dec,
      '      default:',
      '        skipField(r, tag);',
      '    }',
      '  }',
      '  checkEnd(r, end);',
      '  return m;',
      '}',
      '',
      `export const ${name}: MessageCodec<${name}> = {`,
      `  typeName: ${q(t.fullName.slice(1))},`,
      `  encode: (m) => enc${name}(m, Writer.create()).finish(),`,
      '  decode: (bytes) => {',
      '    const r = Reader.create(bytes);',
      `    return dec${name}(r, r.len);`,
      '  },',
      '};',
      '',
    ];
    return lines.join('\n');
  }

  /** Statement writing one value; with a tag, that tag first (packed runs have none per value). */
  private writeValue(fi: ReturnType<ModuleWriter['fieldInfo']>, v: string, tag?: number): string {
    const w = tag === undefined ? 'w' : `w.uint32(${tag})`;
    if (fi.kind === 'message') return `enc${fi.msg}(${v}, ${w}.fork()).ldelim()`;
    if (fi.info.long) {
      this.use('toLong');
      return `${w}.${fi.info.rw}(toLong(${v}))`;
    }
    return `${w}.${fi.info.rw}(${v})`;
  }

  private readValue(fi: ReturnType<ModuleWriter['fieldInfo']>, end: string): string {
    if (fi.kind === 'message') {
      this.use('subEnd');
      return `dec${fi.msg}(r, subEnd(r, ${end}))`;
    }
    if (fi.info.long) {
      this.use('fromLong');
      return `fromLong(r.${fi.info.rw}(), ${fi.info.long === 'unsigned'})`;
    }
    return `r.${fi.info.rw}()`;
  }

  private tag(id: number, wire: number): number {
    return ((id << 3) | wire) >>> 0;
  }

  private encField(f: protobuf.Field, m: string, fi: ReturnType<ModuleWriter['fieldInfo']>): string {
    const { info } = fi;
    if (f.repeated) {
      if (f.packed && info.wire !== 2) {
        return `  if (${m} && ${m}.length) {\n    w.uint32(${this.tag(f.id, 2)}).fork();\n    for (const v of ${m}) ${this.writeValue(fi, 'v')};\n    w.ldelim();\n  }`;
      }
      return `  if (${m}) for (const v of ${m}) ${this.writeValue(fi, 'v', this.tag(f.id, info.wire))};`;
    }
    // proto3 implicit presence: the default value is not written (as the Go and Rust encoders do).
    let present: string;
    if (info.ts === 'Uint8Array') present = `${m} && ${m}.length`;
    else if (f.type === 'double' || f.type === 'float') present = `${m} !== undefined && ${m} !== null && !Object.is(${m}, 0)`;
    else present = `${m}`;
    return `  if (${present}) ${this.writeValue(fi, m, this.tag(f.id, info.wire))};`;
  }

  private decField(f: protobuf.Field, fi: ReturnType<ModuleWriter['fieldInfo']>): string {
    const { info } = fi;
    const target = `m.${f.name}`;
    const out: string[] = [`      case ${f.id}:`];
    if (f.repeated && info.wire !== 2) {
      // Packed or not, whatever this side would write: a parser must accept both.
      this.use('subEnd');
      out.push(
        '        if ((tag & 7) === 2) {',
        '          const e = subEnd(r, end);',
        `          while (r.pos < e) ${target}.push(${this.readValue(fi, 'e')});`,
        '          checkEnd(r, e);',
        `        } else if ((tag & 7) === ${info.wire}) ${target}.push(${this.readValue(fi, 'end')});`,
        '        else skipField(r, tag);',
        '        break;',
      );
      return out.join('\n');
    }
    const value = this.readValue(fi, 'end');
    out.push(
      `        if ((tag & 7) !== ${info.wire}) skipField(r, tag);`,
      f.repeated ? `        else ${target}.push(${value});` : `        else ${target} = ${value};`,
      '        break;',
    );
    return out.join('\n');
  }

  private encMap(f: protobuf.MapField, m: string, fi: ReturnType<ModuleWriter['fieldInfo']>): string {
    const value = this.writeValue(fi, 'v', this.tag(2, fi.info.wire));
    return [
      `  if (${m}) {`,
      `    for (const [k, v] of Object.entries(${m})) {`,
      '      if (v === undefined) continue;',
      `      w.uint32(${this.tag(f.id, 2)}).fork().uint32(10).string(k);`,
      `      ${value};`,
      '      w.ldelim();',
      '    }',
      '  }',
    ].join('\n');
  }

  private decMap(f: protobuf.MapField, fi: ReturnType<ModuleWriter['fieldInfo']>): string {
    this.use('subEnd');
    const valueTag = this.tag(2, fi.info.wire);
    return [
      `      case ${f.id}: {`,
      '        if ((tag & 7) !== 2) {',
      '          skipField(r, tag);',
      '          break;',
      '        }',
      '        const e = subEnd(r, end);',
      "        let k = '';",
      `        let v: ${fi.info.ts} = ${fi.kind === 'message' ? `dec${fi.msg}(r, r.pos)` : fi.info.zero};`,
      '        while (r.pos < e) {',
      '          const t = readTag(r);',
      '          if (t === 10) k = r.string();',
      `          else if (t === ${valueTag}) v = ${this.readValue(fi, 'e')};`,
      '          else skipField(r, t);',
      '        }',
      '        checkEnd(r, e);',
      // defineProperty: a key such as "__proto__" from the wire stays an ordinary entry.
      `        Object.defineProperty(m.${f.name}, k, { value: v, enumerable: true, writable: true, configurable: true });`,
      '        break;',
      '      }',
    ].join('\n');
  }

  private serviceCode(s: protobuf.Service): string {
    this.use('method', 'service');
    const methods = s.methodsArray.map((mt) => {
      if (mt.requestStream || mt.responseStream) throw new Error(`${mt.fullName}: streaming rpcs are not supported`);
      const req = this.tsName(mt.resolvedRequestType!);
      const res = this.tsName(mt.resolvedResponseType!);
      return `${doc(mt.comment, '  ')}  ${mt.name}: method(${q(mt.name)}, ${req}, ${res}),`;
    });
    return `${doc(joinDoc(s.comment, `The ttrpc service ${s.fullName.slice(1)}.`))}export const ${this.tsName(s)} = service(${q(s.fullName.slice(1))}, {\n${methods.join('\n')}\n});\n`;
  }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const check = process.argv.includes('--check');
  let stale = 0;
  for (const [out, code] of generateAllProtoModules()) {
    const file = path.join(PACKAGE_ROOT, out);
    const old = await readFile(file, 'utf8').catch(() => '');
    if (old === code) continue;
    stale++;
    if (check) process.stderr.write(`${out} is stale: run \`npm run gen\`\n`);
    else {
      await writeFile(file, code);
      process.stdout.write(`wrote ${out}\n`);
    }
  }
  if (check && stale) process.exit(1);
}
