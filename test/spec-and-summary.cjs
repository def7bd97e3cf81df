// Mocha reporter: the usual spec output, plus the run's counts written as JSON to
// $MOCHA_JSON_REPORT (when set) so .ci/run can print "N passed, N failed, N skipped".
'use strict';
const fs = require('node:fs');
const Mocha = require('mocha');

class SpecAndSummary extends Mocha.reporters.Spec {
  constructor(runner, options) {
    super(runner, options);
    runner.once(Mocha.Runner.constants.EVENT_RUN_END, () => {
      const file = process.env.MOCHA_JSON_REPORT;
      if (file) fs.writeFileSync(file, JSON.stringify({ stats: this.stats }));
    });
  }
}

module.exports = SpecAndSummary;
