import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeedbackRecord(_message.Message):
    __slots__ = ("feedback_id", "project", "task_id", "prompt_id", "annotator_id", "confidence", "lead_time_seconds", "client_time", "metadata", "guidelines_version", "preference", "ranking", "ratings", "correction", "flag")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    LEAD_TIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_TIME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    GUIDELINES_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREFERENCE_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    RATINGS_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    feedback_id: str
    project: str
    task_id: str
    prompt_id: str
    annotator_id: str
    confidence: float
    lead_time_seconds: float
    client_time: _timestamp_pb2.Timestamp
    metadata: _containers.ScalarMap[str, str]
    guidelines_version: str
    preference: Preference
    ranking: Ranking
    ratings: Ratings
    correction: Correction
    flag: Flag
    def __init__(self, feedback_id: _Optional[str] = ..., project: _Optional[str] = ..., task_id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., annotator_id: _Optional[str] = ..., confidence: _Optional[float] = ..., lead_time_seconds: _Optional[float] = ..., client_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., guidelines_version: _Optional[str] = ..., preference: _Optional[_Union[Preference, _Mapping]] = ..., ranking: _Optional[_Union[Ranking, _Mapping]] = ..., ratings: _Optional[_Union[Ratings, _Mapping]] = ..., correction: _Optional[_Union[Correction, _Mapping]] = ..., flag: _Optional[_Union[Flag, _Mapping]] = ...) -> None: ...

class Preference(_message.Message):
    __slots__ = ("candidate_a_id", "candidate_b_id", "choice", "strength")
    class Choice(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CHOICE_UNSPECIFIED: _ClassVar[Preference.Choice]
        CHOICE_A: _ClassVar[Preference.Choice]
        CHOICE_B: _ClassVar[Preference.Choice]
        CHOICE_TIE: _ClassVar[Preference.Choice]
        CHOICE_BOTH_BAD: _ClassVar[Preference.Choice]
    CHOICE_UNSPECIFIED: Preference.Choice
    CHOICE_A: Preference.Choice
    CHOICE_B: Preference.Choice
    CHOICE_TIE: Preference.Choice
    CHOICE_BOTH_BAD: Preference.Choice
    CANDIDATE_A_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_B_ID_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    candidate_a_id: str
    candidate_b_id: str
    choice: Preference.Choice
    strength: float
    def __init__(self, candidate_a_id: _Optional[str] = ..., candidate_b_id: _Optional[str] = ..., choice: _Optional[_Union[Preference.Choice, str]] = ..., strength: _Optional[float] = ...) -> None: ...

class Ranking(_message.Message):
    __slots__ = ("entries",)
    class Entry(_message.Message):
        __slots__ = ("candidate_id", "rank")
        CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
        RANK_FIELD_NUMBER: _ClassVar[int]
        candidate_id: str
        rank: int
        def __init__(self, candidate_id: _Optional[str] = ..., rank: _Optional[int] = ...) -> None: ...
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Ranking.Entry]
    def __init__(self, entries: _Optional[_Iterable[_Union[Ranking.Entry, _Mapping]]] = ...) -> None: ...

class Ratings(_message.Message):
    __slots__ = ("entries",)
    class Entry(_message.Message):
        __slots__ = ("candidate_id", "aspect", "value")
        CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
        ASPECT_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        candidate_id: str
        aspect: str
        value: float
        def __init__(self, candidate_id: _Optional[str] = ..., aspect: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Ratings.Entry]
    def __init__(self, entries: _Optional[_Iterable[_Union[Ratings.Entry, _Mapping]]] = ...) -> None: ...

class Correction(_message.Message):
    __slots__ = ("candidate_id", "corrected_text", "note")
    CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
    CORRECTED_TEXT_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    candidate_id: str
    corrected_text: str
    note: str
    def __init__(self, candidate_id: _Optional[str] = ..., corrected_text: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class Flag(_message.Message):
    __slots__ = ("candidate_id", "kind", "note")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Flag.Kind]
        KIND_HARMFUL: _ClassVar[Flag.Kind]
        KIND_PII: _ClassVar[Flag.Kind]
        KIND_SPAM: _ClassVar[Flag.Kind]
        KIND_OTHER: _ClassVar[Flag.Kind]
    KIND_UNSPECIFIED: Flag.Kind
    KIND_HARMFUL: Flag.Kind
    KIND_PII: Flag.Kind
    KIND_SPAM: Flag.Kind
    KIND_OTHER: Flag.Kind
    CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    candidate_id: str
    kind: Flag.Kind
    note: str
    def __init__(self, candidate_id: _Optional[str] = ..., kind: _Optional[_Union[Flag.Kind, str]] = ..., note: _Optional[str] = ...) -> None: ...

class RecordResult(_message.Message):
    __slots__ = ("feedback_id", "status", "field", "reason", "seq")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[RecordResult.Status]
        STATUS_ACCEPTED: _ClassVar[RecordResult.Status]
        STATUS_DUPLICATE: _ClassVar[RecordResult.Status]
        STATUS_REJECTED: _ClassVar[RecordResult.Status]
    STATUS_UNSPECIFIED: RecordResult.Status
    STATUS_ACCEPTED: RecordResult.Status
    STATUS_DUPLICATE: RecordResult.Status
    STATUS_REJECTED: RecordResult.Status
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    feedback_id: str
    status: RecordResult.Status
    field: str
    reason: str
    seq: int
    def __init__(self, feedback_id: _Optional[str] = ..., status: _Optional[_Union[RecordResult.Status, str]] = ..., field: _Optional[str] = ..., reason: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class SubmitFeedbackRequest(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[FeedbackRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[FeedbackRecord, _Mapping]]] = ...) -> None: ...

class SubmitFeedbackResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RecordResult]
    def __init__(self, results: _Optional[_Iterable[_Union[RecordResult, _Mapping]]] = ...) -> None: ...

class FeedbackBatch(_message.Message):
    __slots__ = ("sequence", "records")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    records: _containers.RepeatedCompositeFieldContainer[FeedbackRecord]
    def __init__(self, sequence: _Optional[int] = ..., records: _Optional[_Iterable[_Union[FeedbackRecord, _Mapping]]] = ...) -> None: ...

class BatchAck(_message.Message):
    __slots__ = ("sequence", "results")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    results: _containers.RepeatedCompositeFieldContainer[RecordResult]
    def __init__(self, sequence: _Optional[int] = ..., results: _Optional[_Iterable[_Union[RecordResult, _Mapping]]] = ...) -> None: ...

class PullTasksRequest(_message.Message):
    __slots__ = ("project", "annotator_id", "max_tasks", "lease_seconds", "follow")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_TASKS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    project: str
    annotator_id: str
    max_tasks: int
    lease_seconds: int
    follow: bool
    def __init__(self, project: _Optional[str] = ..., annotator_id: _Optional[str] = ..., max_tasks: _Optional[int] = ..., lease_seconds: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("candidate_id", "text", "policy_version")
    CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    candidate_id: str
    text: str
    policy_version: int
    def __init__(self, candidate_id: _Optional[str] = ..., text: _Optional[str] = ..., policy_version: _Optional[int] = ...) -> None: ...

class RatingScale(_message.Message):
    __slots__ = ("aspect", "min", "max")
    ASPECT_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    aspect: str
    min: float
    max: float
    def __init__(self, aspect: _Optional[str] = ..., min: _Optional[float] = ..., max: _Optional[float] = ...) -> None: ...

class LabelingTask(_message.Message):
    __slots__ = ("task_id", "project", "prompt_id", "prompt", "candidates", "rating_scales", "lease_expires_at", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    RATING_SCALES_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    project: str
    prompt_id: str
    prompt: str
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    rating_scales: _containers.RepeatedCompositeFieldContainer[RatingScale]
    lease_expires_at: _timestamp_pb2.Timestamp
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, task_id: _Optional[str] = ..., project: _Optional[str] = ..., prompt_id: _Optional[str] = ..., prompt: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., rating_scales: _Optional[_Iterable[_Union[RatingScale, _Mapping]]] = ..., lease_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("project",)
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    project: str
    def __init__(self, project: _Optional[str] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("total_records", "by_kind", "by_project", "by_annotator", "watermark", "open_tasks")
    class ByKindEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ByProjectEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ByAnnotatorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TOTAL_RECORDS_FIELD_NUMBER: _ClassVar[int]
    BY_KIND_FIELD_NUMBER: _ClassVar[int]
    BY_PROJECT_FIELD_NUMBER: _ClassVar[int]
    BY_ANNOTATOR_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    OPEN_TASKS_FIELD_NUMBER: _ClassVar[int]
    total_records: int
    by_kind: _containers.ScalarMap[str, int]
    by_project: _containers.ScalarMap[str, int]
    by_annotator: _containers.ScalarMap[str, int]
    watermark: int
    open_tasks: int
    def __init__(self, total_records: _Optional[int] = ..., by_kind: _Optional[_Mapping[str, int]] = ..., by_project: _Optional[_Mapping[str, int]] = ..., by_annotator: _Optional[_Mapping[str, int]] = ..., watermark: _Optional[int] = ..., open_tasks: _Optional[int] = ...) -> None: ...
