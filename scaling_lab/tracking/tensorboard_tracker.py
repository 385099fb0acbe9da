"""TensorBoard event files, written with TensorBoard's own writer and protos (no TensorFlow, no torch).

Layout under the log directory: <study>/<trial_id>/ per trial (the curve and final metrics as scalars, the axes
as hparams, so the HParams dashboard lines trials up), <study>/study/ for the study (report and law.json as
text, the plots as images, and the files themselves beside the events). Directory names come from the study
name (a plain name) and trial ids only. A trial directory records the trial's `finished_at` in
scaling_lab.json; an export finding the same value leaves it alone, another one rewrites it.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

from scaling_lab.tracking.layout import StudyRecord, TrialRecord

MARKER = "scaling_lab.json"
STUDY_FOLDER = "study"
FAILED_STATUSES = ("error", "oom")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # PNG colour type -> channels (palette images read as RGB)


def _seconds(moment) -> float:
    return moment.timestamp() if moment else time.time()


class _Events:
    """One run's event file."""

    def __init__(self, folder: Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        folder.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(folder))

    def add(self, step: int, wall_time: float, values: list) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        self.writer.add_event(Event(wall_time=wall_time, step=step, summary=Summary(value=values)))

    def close(self) -> None:
        self.writer.close()


def _scalar(tag: str, value: float):
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary.Value(tag=tag, simple_value=value)


def _text(tag: str, text: str):
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.text.metadata import create_summary_metadata

    tensor = TensorProto(dtype="DT_STRING", string_val=[text.encode()],
                         tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))
    return Summary.Value(tag=tag, metadata=create_summary_metadata(tag, ""), tensor=tensor)


def _image(tag: str, png: bytes):
    from tensorboard.compat.proto.summary_pb2 import Summary

    if not png.startswith(PNG_SIGNATURE):
        raise ValueError(f"{tag}: not a PNG file")
    width, height = struct.unpack(">II", png[16:24])
    channels = PNG_CHANNELS.get(png[25], 4)
    return Summary.Value(tag=tag, image=Summary.Image(height=height, width=width, colorspace=channels,
                                                      encoded_image_string=png))


def _hparams(trial: TrialRecord) -> list:
    """The HParams plugin's session start and end, built from its protos as TensorBoard's own writers do."""
    from google.protobuf import struct_pb2
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    def value(raw) -> struct_pb2.Value:
        if isinstance(raw, bool):
            return struct_pb2.Value(bool_value=raw)
        if isinstance(raw, (int, float)):
            return struct_pb2.Value(number_value=float(raw))
        return struct_pb2.Value(string_value=str(raw))

    start = plugin_data_pb2.SessionStartInfo(group_name=trial.trial_id, start_time_secs=_seconds(trial.started_at))
    for name, raw in trial.parameters.items():
        start.hparams[name].CopyFrom(value(raw))
    status = api_pb2.STATUS_FAILURE if trial.status in FAILED_STATUSES else api_pb2.STATUS_SUCCESS
    end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=_seconds(trial.finished_at))
    return [
        Summary.Value(tag=metadata.SESSION_START_INFO_TAG, tensor=metadata.NULL_TENSOR,
                      metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(
                          session_start_info=start))),
        Summary.Value(tag=metadata.SESSION_END_INFO_TAG, tensor=metadata.NULL_TENSOR,
                      metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(
                          session_end_info=end))),
    ]


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, logdir: str | Path, study: str):
        self.root = Path(logdir).expanduser().resolve() / study

    def where(self) -> str:
        return f"log directory {self.root}"

    def start_study(self, study: StudyRecord) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def log_trial(self, trial: TrialRecord) -> str:
        folder = self.root / trial.trial_id
        outcome = "logged"
        if folder.exists():
            try:
                finished = json.loads((folder / MARKER).read_text()).get("finished_at")
            except (OSError, ValueError):
                finished = None
            if finished == trial.finished_key:
                return "unchanged"
            shutil.rmtree(folder)
            outcome = "replaced"
        wall_time = _seconds(trial.finished_at)
        events = _Events(folder)
        try:
            events.add(0, _seconds(trial.started_at), _hparams(trial))
            for step, values in trial.steps:
                events.add(step, wall_time, [_scalar(name, value) for name, value in values.items()])
            final = [_scalar(name, value) for name, value in trial.final_metrics.items()]
            events.add(trial.last_step, wall_time, final)
            events.add(trial.last_step, wall_time, [_text("tags", json.dumps(trial.tags, indent=1))])
        finally:
            events.close()
        (folder / MARKER).write_text(json.dumps({"trial_id": trial.trial_id, "finished_at": trial.finished_key}))
        return outcome

    def finish_study(self, study: StudyRecord) -> None:
        folder = self.root / STUDY_FOLDER
        if folder.exists():
            shutil.rmtree(folder)
        events = _Events(folder)
        try:
            values = [_scalar("trials", float(study.trials))]
            values += [_scalar(f"trials_{status}", float(count)) for status, count in study.statuses.items()]
            events.add(0, time.time(), values)
            for name, content in sorted(study.artifacts.items()):
                (folder / name).write_bytes(content)
                if name.endswith(".png"):
                    events.add(0, time.time(), [_image(name.removesuffix(".png"), content)])
                elif name.endswith((".md", ".json", ".txt", ".yaml")):
                    events.add(0, time.time(), [_text(name, content.decode(errors="replace"))])
        finally:
            events.close()

    def close(self) -> None:
        pass
