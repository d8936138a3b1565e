//! `GET /openapi.json`: the OpenAPI 3.1 description of the routes, generated from the
//! request types the handlers parse (`utoipa`), so it cannot drift from them.

use crate::{anthropic, openai, operations};
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sparrow",
        description = "The OpenAI and Anthropic APIs over Sparrow's engine (sparrow serve)"
    ),
    paths(
        openai::chat_completions,
        openai::completions,
        openai::model,
        operations::models,
        anthropic::messages,
        anthropic::count_tokens,
        operations::health,
        operations::metrics,
    )
)]
pub struct ApiDoc;

/// The request bodies whose `model` must name the served model.
const MODEL_FIELDS: [&str; 4] = [
    "ChatRequest",
    "CompletionRequest",
    "MessagesRequest",
    "CountTokensRequest",
];

/// The document as JSON, with `model` in every request body restricted to the one model
/// this server serves (any other name is a 404), so tools that generate requests from the
/// document, such as schemathesis, reach the generation paths.
pub fn document(served_model_name: &str) -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    for name in MODEL_FIELDS {
        if let Some(model) = doc
            .pointer_mut(&format!("/components/schemas/{name}/properties/model"))
            .and_then(serde_json::Value::as_object_mut)
        {
            model.insert("enum".into(), serde_json::json!([served_model_name]));
        }
    }
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MAX_CHOICES;
    use sparrow::engine::logprobs::MAX_TOP_LOGPROBS;

    #[test]
    fn documented_bounds_are_the_servers() {
        let doc = document("m");
        let at = |p: &str| doc.pointer(p).cloned().unwrap_or_default();
        let s = "/components/schemas";
        assert_eq!(
            at(&format!("{s}/CommonOptions/properties/n/maximum")),
            MAX_CHOICES
        );
        assert_eq!(
            at(&format!("{s}/ChatRequest/properties/top_logprobs/maximum")),
            MAX_TOP_LOGPROBS
        );
        for name in MODEL_FIELDS {
            assert_eq!(
                at(&format!("{s}/{name}/properties/model/enum")),
                serde_json::json!(["m"]),
                "{name}"
            );
        }
    }
}
