"""The daemon's side of its two unix sockets: ``ctl.sock`` (requests and answers) and ``use.sock``
(one-way usage notes).

One I/O thread owns every socket; requests run on a small bounded pool of handler threads and hand
their answers to a bounded outbound queue per connection. Invariants: no lock of the daemon's parts is
held across socket I/O; a client that stops reading loses only its own connection; every read is
bounded by the wire format's line limit. The parts' state lives in ``daemon``; this package only
carries requests to it.
"""
