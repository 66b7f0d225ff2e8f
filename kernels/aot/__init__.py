"""Offline analysis of the Triton kernels, no GPU needed: `python -m kernels.aot.check` compiles every launched
kernel for sm_90 and reports registers, spills, SASS and MUFU per logit element (check), parses SASS (sass),
evaluates the kernels' source to attribute instructions (source), and renders the report (report)."""
