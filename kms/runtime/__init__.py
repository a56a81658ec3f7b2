"""Assembling and running one KME: ``assembly`` (settings to a Runtime), ``sources`` (each link's key
source), ``filler`` (the pool filler loop), ``background`` (a server process's background work) and
``logs`` (structured logging)."""
