//! Where records come from. Only [`kinesis`] knows AWS Kinesis types.

pub mod kinesis;
