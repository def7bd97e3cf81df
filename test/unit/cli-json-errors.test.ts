/**
 * `--json` gives one JSON object on stdout also when a command stops before its report: no
 * configuration, a missing or unparsable file, an unsupported hypervisor. The object keeps the
 * command's report shape (validate's, check's) and lists the error in `problems[]`.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { main } from '../../cli/main.js';
import type { ValidateReport } from '../../cli/validate.js';
import { TempDir } from '../helpers/tmp.js';
import { CLI, STACK_FRAME, capture } from '../helpers/cli.js';

describe('kata-runtime --json on early errors', () => {
  let tmp: TempDir;
  before(() => (tmp = new TempDir('kata-json-')));
  after(() => tmp.cleanup());

  async function run(argv: string[]) {
    // An empty sysroot: no configuration at the default paths.
    const c = capture({ KATA_TS_SYSROOT: tmp.path });
    const code = await main(argv, c.io);
    return { code, stdout: c.stdout(), stderr: c.stderr() };
  }

  const cases: { what: string; file: () => string | undefined; code: string; key?: string }[] = [
    { what: 'no configuration anywhere', file: () => undefined, code: 'KATA_ERR_CONFIG_NOT_FOUND' },
    { what: 'a missing file', file: () => '/nonexistent/configuration.toml', code: 'KATA_ERR_CONFIG_NOT_FOUND' },
    { what: 'an unparsable file', file: () => tmp.file('bad.toml', '[hypervisor.qemu\n'), code: 'KATA_ERR_CONFIG_PARSE' },
    { what: 'an unsupported hypervisor', file: () => tmp.file('fc.toml', '[hypervisor.firecracker]\npath = "/usr/bin/firecracker"\n'), code: 'KATA_ERR_HYPERVISOR_UNSUPPORTED' },
    { what: 'an array of tables', file: () => tmp.file('aot.toml', '[[hypervisor.qemu]]\npath = "/usr/bin/qemu-system-x86_64"\n'), code: 'KATA_ERR_CONFIG_TABLE_ARRAY', key: 'hypervisor.qemu' },
  ];

  for (const command of ['validate', 'check', 'kata-check']) {
    for (const c of cases) {
      it(`${command} --json prints one object with problems[] for ${c.what}`, async () => {
        const file = c.file();
        const r = await run([...(file ? ['--config', file] : []), command, '--json']);
        assert.equal(r.code, 1, r.stderr);
        const doc = JSON.parse(r.stdout) as ValidateReport & { capable?: boolean; checks?: unknown[] };
        assert.equal(doc.valid, false);
        assert.equal(doc.problems.length, 1);
        assert.equal(doc.problems[0]?.code, c.code);
        if (c.key) assert.equal(doc.problems[0]?.key, c.key);
        if (command === 'validate') assert.deepEqual([doc.plugins, doc.plan, doc.vm], [[], null, null]);
        else assert.deepEqual([doc.capable, doc.checks], [false, []]);
        assert.match(r.stderr, new RegExp(c.code));
      });
    }
  }

  for (const command of ['env', 'kata-env']) {
    it(`${command} --json without a configuration prints one object with problems[]`, async () => {
      const r = await run([command, '--json']);
      assert.equal(r.code, 1);
      const doc = JSON.parse(r.stdout) as { valid: boolean; configPath: string | null; problems: { code: string }[] };
      assert.deepEqual([doc.valid, doc.configPath, doc.problems.map((p) => p.code)], [false, null, ['KATA_ERR_CONFIG_NOT_FOUND']]);
    });
  }

  it('prints the JSON object from the executable too, with no stack trace', () => {
    const r = spawnSync(process.execPath, [CLI, '--config', '/nonexistent/configuration.toml', 'validate', '--json'], { encoding: 'utf8', env: { ...process.env, KATA_CONF_FILE: '' } });
    assert.equal(r.status, 1);
    assert.equal((JSON.parse(r.stdout) as ValidateReport).problems[0]?.code, 'KATA_ERR_CONFIG_NOT_FOUND');
    assert.doesNotMatch(r.stderr, STACK_FRAME);
  });

  it('prints nothing on stdout without --json', async () => {
    const r = await run(['--config', '/nonexistent/configuration.toml', 'validate']);
    assert.deepEqual([r.code, r.stdout], [1, '']);
  });
});
