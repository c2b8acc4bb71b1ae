//! The Kinesis stream step: created with the configured capacity, or found
//! and left as it is (resharding is a person's decision, not a side effect).

use super::{Action, ProvisionError, Step};
use crate::source::kinesis::{KinesisSource, SourceError, StreamCapacity, StreamDescription};

/// Makes sure the stream of `source` exists, with `capacity` if it is new.
pub async fn ensure(
    source: &KinesisSource,
    capacity: StreamCapacity,
) -> Result<Step, ProvisionError> {
    let ensured = match source.ensure_stream_with(capacity).await {
        Ok(ensured) => ensured,
        // Kinesalite, for one, knows no on-demand mode and wants a count.
        Err(SourceError::InvalidArgument { detail, .. })
            if capacity == StreamCapacity::OnDemand =>
        {
            return Err(ProvisionError::Unsupported(format!(
                "stream {}: this Kinesis endpoint does not create on-demand streams \
                 (emulators such as kinesalite do not): use --shards N (it said: {detail})",
                source.stream()
            )));
        }
        Err(err) => return Err(err.into()),
    };
    let description = &ensured.description;
    let mut detail = describe(description);
    if let Some(note) = difference(description, capacity).filter(|_| !ensured.created) {
        detail.push_str(&format!(" ({note})"));
    }
    Ok(Step {
        resource: "stream",
        name: description.name.clone(),
        action: if ensured.created {
            Action::Created
        } else {
            Action::Found
        },
        detail,
    })
}

fn describe(stream: &StreamDescription) -> String {
    let mode = if stream.on_demand {
        "on-demand"
    } else {
        "provisioned"
    };
    format!(
        "{mode}, {} open shards, {} h retention, {}, {}",
        stream.open_shards, stream.retention_hours, stream.status, stream.arn
    )
}

/// What differs between an existing stream and the configuration, if
/// anything: said, not changed.
fn difference(stream: &StreamDescription, capacity: StreamCapacity) -> Option<String> {
    match capacity {
        StreamCapacity::OnDemand if !stream.on_demand => Some(
            "--on-demand not applied: the stream is provisioned; switch it with \
             UpdateStreamMode if you mean to"
                .into(),
        ),
        StreamCapacity::Provisioned { .. } if stream.on_demand => Some(
            "--shards not applied: the stream is on-demand; switch it with UpdateStreamMode \
             if you mean to"
                .into(),
        ),
        StreamCapacity::Provisioned { shards } if shards != stream.open_shards => Some(format!(
            "--shards {shards} not applied: reshard with UpdateShardCount if you mean to"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(on_demand: bool, open_shards: u32) -> StreamDescription {
        StreamDescription {
            name: "telemetry".into(),
            arn: "arn:aws:kinesis:us-east-1:000000000000:stream/telemetry".into(),
            status: "ACTIVE".into(),
            on_demand,
            open_shards,
            retention_hours: 24,
            created_at: std::time::SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn differences_are_reported_not_applied() {
        let provisioned = |shards| StreamCapacity::Provisioned { shards };
        let cases = [
            (stream(false, 2), provisioned(2), None),
            (
                stream(false, 2),
                provisioned(4),
                Some("--shards 4 not applied"),
            ),
            (
                stream(true, 4),
                provisioned(4),
                Some("the stream is on-demand"),
            ),
            (
                stream(false, 2),
                StreamCapacity::OnDemand,
                Some("the stream is provisioned"),
            ),
            (stream(true, 4), StreamCapacity::OnDemand, None),
        ];
        for (stream, capacity, expected) in cases {
            let note = difference(&stream, capacity);
            match expected {
                None => assert_eq!(note, None, "{capacity:?}"),
                Some(part) => assert!(note.as_deref().unwrap_or("").contains(part), "{note:?}"),
            }
        }
        assert_eq!(
            describe(&stream(false, 2)),
            "provisioned, 2 open shards, 24 h retention, ACTIVE, \
             arn:aws:kinesis:us-east-1:000000000000:stream/telemetry"
        );
    }
}
