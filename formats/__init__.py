"""tadsr.formats: one slice per phone format (export, INT8, localisation, runner options), registered once."""
