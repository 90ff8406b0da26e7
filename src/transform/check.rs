//! Checks a compiled script before it is accepted: a call to a function that is neither built
//! in, registered nor defined in the script would fail every record it reaches, so it is
//! refused when the version is created, published or tried, with its name and position.
//!
//! What cannot be known before running is let through: calls through function pointers kept
//! in variables or map properties (`let f = |x| x; f(1)`, `o.f(1)`), and `Fn("name")`.

use std::collections::HashSet;
use std::sync::OnceLock;

use rhai::{AST, ASTNode, Engine, Expr, Position, Stmt};

/// Functions the engine resolves by name whatever is registered (see Rhai's `KEYWORD_*`).
const KEYWORDS: [&str; 11] = [
    "print",
    "debug",
    "type_of",
    "eval",
    "Fn",
    "call",
    "curry",
    "is_shared",
    "is_def_var",
    "is_def_fn",
    "this",
];

/// Every function name the sandboxed engine knows. The set is the same for every transform
/// (limits differ, functions do not), so it is collected once per process.
fn known(engine: &Engine) -> &'static HashSet<String> {
    static KNOWN: OnceLock<HashSet<String>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        let mut names: HashSet<String> = engine
            .collect_fn_metadata(None, |info| Some(info.metadata.name.to_string()), true)
            .into_iter()
            .collect();
        names.extend(KEYWORDS.iter().map(|k| (*k).to_owned()));
        names
    })
}

/// The first call in `ast` to a function nobody defines: its name and position.
pub(super) fn unknown_call(engine: &Engine, ast: &AST) -> Option<(String, Position)> {
    let known = known(engine);
    let mut defined: HashSet<String> = HashSet::new();
    // Names that may hold a function pointer: variables, parameters, map keys and properties.
    let mut pointers: HashSet<String> = HashSet::new();
    for f in ast.iter_functions() {
        defined.insert(f.name.to_owned());
        pointers.extend(f.params.iter().map(|p| (*p).to_owned()));
    }
    let mut calls: Vec<(String, Position, bool)> = Vec::new();
    ast.walk(&mut |path: &[ASTNode]| {
        match path.last() {
            Some(ASTNode::Stmt(Stmt::Var(var, ..))) => {
                pointers.insert(var.0.name.to_string());
            }
            Some(
                ASTNode::Stmt(Stmt::FnCall(call, pos)) | ASTNode::Expr(Expr::FnCall(call, pos)),
            ) if call.op_token.is_none() => {
                calls.push((call.name.to_string(), *pos, false));
            }
            Some(ASTNode::Expr(Expr::MethodCall(call, pos))) => {
                calls.push((call.name.to_string(), *pos, true));
            }
            Some(ASTNode::Expr(Expr::Map(map, _))) => {
                pointers.extend(map.0.iter().map(|(key, _)| key.name.to_string()));
                pointers.extend(map.1.keys().map(ToString::to_string));
            }
            // A map literal of constants (closures included) is folded into one value.
            Some(ASTNode::Expr(Expr::DynamicConstant(value, _))) => {
                if let Some(map) = value.read_lock::<rhai::Map>() {
                    pointers.extend(map.keys().map(ToString::to_string));
                }
            }
            Some(ASTNode::Expr(Expr::Property(property, _))) => {
                pointers.insert(property.2.to_string());
            }
            _ => {}
        }
        true
    });
    calls.into_iter().find_map(|(name, pos, _method)| {
        let found = known.contains(&name) || defined.contains(&name) || pointers.contains(&name);
        (!found).then_some((name, pos))
    })
}
