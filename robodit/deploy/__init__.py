"""robodit.deploy: a trained policy away from the training stack: the policy server, its client and wire format.

`server.py` (`robodit serve`) runs a checkpoint behind a token-protected websocket; `client.py`'s `RemotePolicy`
gives the same `predict_action` on the robot's computer; `wire.py` is the message format both trust.
"""
