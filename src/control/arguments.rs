//! Reads a command name and its arguments straight into a command type with serde:
//! the name picks the variant, the arguments fill it. Going through a deserializer of our own
//! (rather than `serde_json::from_value`) is what lets every error name the argument at fault,
//! in QEMU's words, and tell an unknown command from bad arguments without parsing messages.

use serde::de::value::{StrDeserializer, StringDeserializer};
use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, VariantAccess, Visitor};
use serde::forward_to_deserialize_any;
use serde_json::{Map, Value};

/// Why a command could not be read from its QMP input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("The command {0} has not been found")]
    UnknownCommand(String),
    #[error("The command {0} is not available on the guest agent channel")]
    NotOnChannel(String),
    #[error("Parameter '{0}' is missing")]
    Missing(String),
    #[error("Parameter '{0}' is unexpected")]
    Unexpected(String),
    #[error("Invalid parameter '{name}': {reason}")]
    Invalid { name: String, reason: String },
    /// Anything else, such as arguments that are each well-formed but do not go together.
    #[error("{0}")]
    Other(String),
}

impl de::Error for CommandError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Self::Other(msg.to_string())
    }

    fn missing_field(field: &'static str) -> Self {
        Self::Missing(field.to_string())
    }

    fn unknown_field(field: &str, _expected: &'static [&'static str]) -> Self {
        Self::Unexpected(field.to_string())
    }

    /// Only the command name is read as a variant here: argument values are read by
    /// `serde_json`, whose errors become [`CommandError::Invalid`].
    fn unknown_variant(variant: &str, _expected: &'static [&'static str]) -> Self {
        Self::UnknownCommand(variant.to_string())
    }
}

/// One command's QMP input, `execute` and `arguments`, read as a serde enum.
pub(super) struct CommandInput {
    name: String,
    arguments: Map<String, Value>,
}

impl CommandInput {
    pub(super) fn new(name: &str, arguments: Map<String, Value>) -> Self {
        Self { name: name.to_string(), arguments }
    }
}

impl<'de> Deserializer<'de> for CommandInput {
    type Error = CommandError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CommandError> {
        visitor.visit_enum(self)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de> EnumAccess<'de> for CommandInput {
    type Error = CommandError;
    type Variant = Arguments;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Arguments), CommandError> {
        let variant = seed.deserialize(StringDeserializer::<CommandError>::new(self.name))?;
        Ok((variant, Arguments(self.arguments)))
    }
}

/// A command's `arguments` object: the fields of its variant.
pub(super) struct Arguments(Map<String, Value>);

impl<'de> VariantAccess<'de> for Arguments {
    type Error = CommandError;

    fn unit_variant(self) -> Result<(), CommandError> {
        match self.0.into_iter().next() {
            Some((name, _)) => Err(CommandError::Unexpected(name)),
            None => Ok(()),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, CommandError> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, CommandError> {
        self.deserialize_any(visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, CommandError> {
        self.deserialize_any(visitor)
    }
}

impl<'de> Deserializer<'de> for Arguments {
    type Error = CommandError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, CommandError> {
        visitor.visit_map(ArgumentMap { entries: self.0.into_iter(), current: None })
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
        unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

/// The arguments one by one, remembering the name of the one being read so that an invalid
/// value is reported with it.
struct ArgumentMap {
    entries: serde_json::map::IntoIter,
    current: Option<(String, Value)>,
}

impl<'de> MapAccess<'de> for ArgumentMap {
    type Error = CommandError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, CommandError> {
        let Some((name, value)) = self.entries.next() else { return Ok(None) };
        let key = seed.deserialize(StrDeserializer::<CommandError>::new(&name))?;
        self.current = Some((name, value));
        Ok(Some(key))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, CommandError> {
        let (name, value) =
            self.current.take().ok_or_else(|| CommandError::Other("an argument value without its name".into()))?;
        seed.deserialize(value).map_err(|e| CommandError::Invalid { name, reason: e.to_string() })
    }
}
