"""`hitl label-web`: a labeling web page in front of the feedback service.

An aiohttp server (app.py) serves one plain HTML/CSS/JS page (static/) and a
small JSON API; it talks to the feedback service over gRPC with the Python
FeedbackClient. The config is one typed model (config.py); the JSON bodies
of judgements are typed models turned into FeedbackRecords (judgements.py);
the tasks leased to each annotator are held in a TaskBook (tasks.py); who
the annotator is comes from a credential checked in auth.py (personal
tokens, a sign-in proxy's header, or on loopback only a self-declared id).
"""
