"""`gateway loadtest`: a device-fleet load generator with an enforcement check.

Layers: spec, fleet, schedule, histogram, results, enforcement and report are pure; runner
sends the load; fleet_admin talks to the admin API; command runs the flow; cli parses options.
"""
