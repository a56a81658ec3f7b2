"""The web console on the operator listener (DECISIONS.md D-36; docs/OPERATIONS.md "Operator
console"): pages built server side as escaped HTML with inline SVG charts, no JavaScript."""
