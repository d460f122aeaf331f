//! What a session lets one statement do, and the checks that run before
//! DataFusion sees it.
//!
//! DataFusion parses, plans, optimises and evaluates by recursing over the
//! statement, so a long operator chain (`SELECT 1 + 1 + …`) or deep nesting
//! overflows a thread's stack and aborts the whole process. Statements
//! therefore run on [`statement_runtime`], whose threads have large stacks,
//! and a statement is weighed from its tokens (no recursion) and refused
//! when it is heavier than [`MAX_STATEMENT_WEIGHT`].

use std::sync::OnceLock;

use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
use vectorflow_core::quote;
use vectorflow_core::{Error, Result};
use vectorflow_operators::filter::allocating_function;

use crate::dialect::VectorflowDialect;

/// The heaviest statement a session plans. A chained operator weighs 1, a
/// call or parenthesis [`CALL_WEIGHT`], a query block (`SELECT`)
/// [`QUERY_WEIGHT`]. Measured in the dev profile on a 2 MiB stack, a chain of
/// about 86 operators, 19 nested calls or 10 nested subqueries overflows; the
/// statement threads have [`STATEMENT_STACK_BYTES`] (32 times more), where a
/// chain of 2,000 operators still plans and runs (3,000 overflows), so 256
/// keeps a margin of about 8x.
pub const MAX_STATEMENT_WEIGHT: usize = 256;
/// A nested call costs about 4.5 chained operators of stack (86 / 19).
const CALL_WEIGHT: usize = 5;
/// A nested query block costs about 9 chained operators of stack (86 / 10).
const QUERY_WEIGHT: usize = 10;

/// The stack of the threads statements are planned and run on.
pub const STATEMENT_STACK_BYTES: usize = 64 << 20;

/// The longest statement a read-only session takes, in bytes.
pub const MAX_READ_ONLY_STATEMENT_BYTES: usize = 4 << 20;

/// The memory a read-only session's statement may hold in DataFusion's
/// memory pool (sorts, aggregates, joins) by default.
pub const DEFAULT_MEMORY_LIMIT: usize = 512 << 20;

/// How long a read-only session's statement may run, planning included, by default.
pub const DEFAULT_STATEMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// What a session lets one statement do.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlPolicy {
    /// Queries only: no DDL (CREATE EXTERNAL TABLE, CREATE VIEW, DROP), no
    /// DML (INSERT, COPY … TO), no SET or other statements, so no file is
    /// read or written, and no function that allocates from its arguments.
    /// For statements from the network.
    pub read_only: bool,
    /// Bytes each statement may hold in DataFusion's memory pool, without
    /// spilling to disk; `None`: DataFusion's unbounded default.
    pub memory_limit: Option<usize>,
    /// The longest statement text, in bytes.
    pub max_statement_bytes: usize,
    /// The heaviest statement (see [`MAX_STATEMENT_WEIGHT`]).
    pub max_statement_weight: usize,
    /// How long a statement may take, from planning to its last batch;
    /// `None`: no limit.
    pub timeout: Option<std::time::Duration>,
}

impl SqlPolicy {
    /// Everything DataFusion does (the local `vectorflow sql` command),
    /// within the statement weight that keeps planning on the stack.
    pub fn full() -> SqlPolicy {
        SqlPolicy {
            read_only: false,
            memory_limit: None,
            max_statement_bytes: usize::MAX,
            max_statement_weight: MAX_STATEMENT_WEIGHT,
            timeout: None,
        }
    }

    /// Queries only, each within [`DEFAULT_MEMORY_LIMIT`]: for statements
    /// from the network.
    pub fn read_only() -> SqlPolicy {
        SqlPolicy {
            read_only: true,
            memory_limit: Some(DEFAULT_MEMORY_LIMIT),
            max_statement_bytes: MAX_READ_ONLY_STATEMENT_BYTES,
            max_statement_weight: MAX_STATEMENT_WEIGHT,
            timeout: Some(DEFAULT_STATEMENT_TIMEOUT),
        }
    }
}

/// The runtime statements are planned and run on: its threads have
/// [`STATEMENT_STACK_BYTES`] of stack, whoever calls. Built once and kept
/// for the process (so it is never dropped inside another runtime).
pub fn statement_runtime() -> Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<std::result::Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .thread_name("vectorflow-sql")
                .thread_stack_size(STATEMENT_STACK_BYTES)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| Error::Sql(format!("cannot start the SQL runtime: {e}")))
}

/// Refuses, before anything parses it recursively, a statement over the
/// policy's size or weight, or (read-only) one calling a function that
/// allocates from its arguments.
pub fn check_statement(text: &str, policy: &SqlPolicy) -> Result<()> {
    if text.len() > policy.max_statement_bytes {
        return Err(Error::Sql(format!(
            "the statement is {} bytes, more than {} (limit max_statement_bytes)",
            text.len(),
            policy.max_statement_bytes
        )));
    }
    let dialect = VectorflowDialect::default();
    // The tokenizer is a loop over the text: safe on any input.
    let tokens =
        Tokenizer::new(&dialect, text).tokenize().map_err(|e| Error::Sql(quote(&e.to_string()).into_owned()))?;
    let meaningful: Vec<&Token> = tokens.iter().filter(|t| !matches!(t, Token::Whitespace(_))).collect();
    let mut weight = 0usize;
    for (index, token) in meaningful.iter().enumerate() {
        let called = matches!(meaningful.get(index + 1), Some(Token::LParen));
        let token_weight = match token {
            Token::Word(word) if called => {
                if policy.read_only
                    && let Some(why) = sql_allocating_function(&word.value)
                {
                    return Err(Error::Sql(format!(
                        "function `{}` is not allowed in this server's SQL: {why}",
                        quote(&word.value.to_ascii_lowercase())
                    )));
                }
                CALL_WEIGHT
            }
            Token::Word(word) => match word.keyword {
                Keyword::SELECT => QUERY_WEIGHT,
                Keyword::AND
                | Keyword::OR
                | Keyword::NOT
                | Keyword::XOR
                | Keyword::LIKE
                | Keyword::ILIKE
                | Keyword::IS
                | Keyword::IN
                | Keyword::BETWEEN
                | Keyword::SIMILAR
                | Keyword::REGEXP
                | Keyword::RLIKE
                | Keyword::DIV
                | Keyword::COLLATE
                | Keyword::AT
                | Keyword::UNION
                | Keyword::INTERSECT
                | Keyword::EXCEPT
                | Keyword::JOIN => 1,
                _ => 0,
            },
            // A sign on a number in a list (`[-0.1, 0.2]`) is part of the value.
            Token::Minus | Token::Plus
                if matches!(meaningful.get(index + 1), Some(Token::Number(..)))
                    && (index == 0
                        || matches!(
                            meaningful.get(index - 1),
                            Some(Token::Comma | Token::LBracket | Token::LParen)
                        )) =>
            {
                0
            }
            Token::LParen => CALL_WEIGHT,
            Token::Number(..)
            | Token::Char(_)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::NationalStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_)
            | Token::Comma
            | Token::RParen
            | Token::RBracket
            | Token::RBrace
            | Token::SemiColon
            | Token::Period
            | Token::EOF => 0,
            // Every operator symbol (and anything unknown) may nest one level.
            _ => 1,
        };
        weight += token_weight;
        if weight > policy.max_statement_weight {
            return Err(Error::Sql(format!(
                "the statement is too large to plan safely: more than {} operators, calls and query blocks \
                 (limit max_statement_weight; a call weighs {CALL_WEIGHT}, a SELECT {QUERY_WEIGHT}); \
                 use `IN (..)` for long lists of values",
                policy.max_statement_weight
            )));
        }
    }
    Ok(())
}

/// Why a function is refused in read-only SQL: the filters' list, except
/// `make_array`, which SQL needs for vector literals (`[0.1, 0.2]`) and
/// which allocates only as much as the statement text spells out.
fn sql_allocating_function(name: &str) -> Option<&'static str> {
    if name.eq_ignore_ascii_case("make_array") || name.eq_ignore_ascii_case("make_list") {
        return None;
    }
    allocating_function(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_counts_operators_calls_and_query_blocks() {
        let policy = SqlPolicy::read_only();
        let refused = |text: &str| check_statement(text, &policy).unwrap_err().to_string();
        assert!(refused(&format!("SELECT 1{}", " + 1".repeat(300))).contains("max_statement_weight"));
        assert!(refused(&format!("SELECT {}1{}", "abs(".repeat(60), ")".repeat(60))).contains("max_statement_weight"));
        let nested = format!("{}SELECT 1 AS x{}", "SELECT x FROM (".repeat(30), ")".repeat(30));
        assert!(refused(&nested).contains("max_statement_weight"));
        assert!(refused("SELECT REPEAT('x', 5)").contains("function `repeat` is not allowed"));
        assert!(refused("SELECT list_resize([1], 5, 0)").contains("function `list_resize`"));
        assert!(refused(&"x".repeat(MAX_READ_ONLY_STATEMENT_BYTES + 1)).contains("max_statement_bytes"));
        check_statement(
            "SELECT id, l2_distance(v, [-0.5, 0.25]) AS d FROM docs WHERE n IN (1, 2) ORDER BY d LIMIT 3",
            &policy,
        )
        .unwrap();
        check_statement("SELECT make_array(1, 2), repeat('x', 3)", &SqlPolicy::full()).unwrap();
    }
}
