/** ajv options shared by the build-time precompiler and the run-time compiler for third-party schemas. */
export const AJV_OPTIONS = Object.freeze({
  allErrors: true,
  useDefaults: true,
  strict: false,
  coerceTypes: false,
} as const);
