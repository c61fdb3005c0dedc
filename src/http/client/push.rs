//! Push rules, pushers, notifications and third-party protocols.

use std::collections::BTreeMap;

use axum::{Router, extract::State};
use ruma::api::client::{
    push::{
        delete_pushrule, get_notifications, get_pushers, get_pushrule, get_pushrule_actions, get_pushrule_enabled,
        get_pushrules_all, get_pushrules_global_scope, set_pusher, set_pushrule, set_pushrule_actions,
        set_pushrule_enabled,
    },
    thirdparty::get_protocols,
};

use crate::{
    error::Result,
    http::{
        AppState, route,
        ruma::{Ruma, RumaResponse},
    },
};

/// # `GET /_matrix/client/v3/pushrules/`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3pushrules>
async fn get_pushrules_all(
    State(services): State<AppState>,
    req: Ruma<get_pushrules_all::v3::Request>,
) -> Result<RumaResponse<get_pushrules_all::v3::Response>> {
    Ok(get_pushrules_all::v3::Response::new(services.push_rules(&req.session()?.user_id).await?).into())
}

/// # `GET /_matrix/client/v3/pushrules/global/`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3pushrulesglobal>
async fn get_pushrules_global_scope(
    State(services): State<AppState>,
    req: Ruma<get_pushrules_global_scope::v3::Request>,
) -> Result<RumaResponse<get_pushrules_global_scope::v3::Response>> {
    Ok(get_pushrules_global_scope::v3::Response::new(services.push_rules(&req.session()?.user_id).await?).into())
}

/// # `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3pushrulesglobalkindruleid>
async fn get_pushrule(
    State(services): State<AppState>,
    req: Ruma<get_pushrule::v3::Request>,
) -> Result<RumaResponse<get_pushrule::v3::Response>> {
    let b = &req.body;
    let rule = services.push_rule(&req.session()?.user_id, b.kind.clone(), &b.rule_id).await?;
    Ok(get_pushrule::v3::Response::new(rule.into()).into())
}

/// # `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3pushrulesglobalkindruleid>
async fn set_pushrule(
    State(services): State<AppState>,
    req: Ruma<set_pushrule::v3::Request>,
) -> Result<RumaResponse<set_pushrule::v3::Response>> {
    let user = req.session()?.user_id.clone();
    let b = req.body;
    services.set_push_rule(&user, b.rule, b.after.as_deref(), b.before.as_deref()).await?;
    Ok(set_pushrule::v3::Response::new().into())
}

/// # `DELETE /_matrix/client/v3/pushrules/global/{kind}/{ruleId}`
/// <https://spec.matrix.org/v1.19/client-server-api/#delete_matrixclientv3pushrulesglobalkindruleid>
async fn delete_pushrule(
    State(services): State<AppState>,
    req: Ruma<delete_pushrule::v3::Request>,
) -> Result<RumaResponse<delete_pushrule::v3::Response>> {
    let b = &req.body;
    services.delete_push_rule(&req.session()?.user_id, b.kind.clone(), &b.rule_id).await?;
    Ok(delete_pushrule::v3::Response::new().into())
}

/// # `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3pushrulesglobalkindruleidenabled>
async fn get_pushrule_enabled(
    State(services): State<AppState>,
    req: Ruma<get_pushrule_enabled::v3::Request>,
) -> Result<RumaResponse<get_pushrule_enabled::v3::Response>> {
    let b = &req.body;
    let rule = services.push_rule(&req.session()?.user_id, b.kind.clone(), &b.rule_id).await?;
    Ok(get_pushrule_enabled::v3::Response::new(rule.as_ref().enabled()).into())
}

/// # `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3pushrulesglobalkindruleidenabled>
async fn set_pushrule_enabled(
    State(services): State<AppState>,
    req: Ruma<set_pushrule_enabled::v3::Request>,
) -> Result<RumaResponse<set_pushrule_enabled::v3::Response>> {
    let b = &req.body;
    services.set_push_rule_enabled(&req.session()?.user_id, b.kind.clone(), &b.rule_id, b.enabled).await?;
    Ok(set_pushrule_enabled::v3::Response::new().into())
}

/// # `GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3pushrulesglobalkindruleidactions>
async fn get_pushrule_actions(
    State(services): State<AppState>,
    req: Ruma<get_pushrule_actions::v3::Request>,
) -> Result<RumaResponse<get_pushrule_actions::v3::Response>> {
    let b = &req.body;
    let rule = services.push_rule(&req.session()?.user_id, b.kind.clone(), &b.rule_id).await?;
    Ok(get_pushrule_actions::v3::Response::new(rule.as_ref().actions().to_vec()).into())
}

/// # `PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions`
/// <https://spec.matrix.org/v1.19/client-server-api/#put_matrixclientv3pushrulesglobalkindruleidactions>
async fn set_pushrule_actions(
    State(services): State<AppState>,
    req: Ruma<set_pushrule_actions::v3::Request>,
) -> Result<RumaResponse<set_pushrule_actions::v3::Response>> {
    let b = &req.body;
    services.set_push_rule_actions(&req.session()?.user_id, b.kind.clone(), &b.rule_id, b.actions.clone()).await?;
    Ok(set_pushrule_actions::v3::Response::new().into())
}

/// # `GET /_matrix/client/v3/pushers`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3pushers>
async fn get_pushers(
    State(services): State<AppState>,
    req: Ruma<get_pushers::v3::Request>,
) -> Result<RumaResponse<get_pushers::v3::Response>> {
    Ok(get_pushers::v3::Response::new(services.get_pushers(&req.session()?.user_id).await?).into())
}

/// # `POST /_matrix/client/v3/pushers/set`
/// <https://spec.matrix.org/v1.19/client-server-api/#post_matrixclientv3pushersset>
async fn set_pusher(
    State(services): State<AppState>,
    req: Ruma<set_pusher::v3::Request>,
) -> Result<RumaResponse<set_pusher::v3::Response>> {
    let session = req.session()?.clone();
    services.set_pusher(&session, req.body.action).await?;
    Ok(set_pusher::v3::Response::new().into())
}

/// # `GET /_matrix/client/v3/notifications`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3notifications>
async fn get_notifications(
    State(services): State<AppState>,
    req: Ruma<get_notifications::v3::Request>,
) -> Result<RumaResponse<get_notifications::v3::Response>> {
    let b = &req.body;
    let user = &req.session()?.user_id;
    Ok(services.notifications(user, b.from.as_deref(), b.limit, b.only.as_deref()).await?.into())
}

/// # `GET /_matrix/client/v3/thirdparty/protocols`
/// <https://spec.matrix.org/v1.19/client-server-api/#get_matrixclientv3thirdpartyprotocols>
///
/// No application services bridge to other networks yet.
async fn get_protocols(req: Ruma<get_protocols::v3::Request>) -> Result<RumaResponse<get_protocols::v3::Response>> {
    req.session()?;
    Ok(get_protocols::v3::Response::new(BTreeMap::new()).into())
}

pub fn routes(router: Router<AppState>) -> Router<AppState> {
    let router = route::<get_pushrules_all::v3::Request, _, _>(router, get_pushrules_all);
    let router = route::<get_pushrules_global_scope::v3::Request, _, _>(router, get_pushrules_global_scope);
    let router = route::<get_pushrule::v3::Request, _, _>(router, get_pushrule);
    let router = route::<set_pushrule::v3::Request, _, _>(router, set_pushrule);
    let router = route::<delete_pushrule::v3::Request, _, _>(router, delete_pushrule);
    let router = route::<get_pushrule_enabled::v3::Request, _, _>(router, get_pushrule_enabled);
    let router = route::<set_pushrule_enabled::v3::Request, _, _>(router, set_pushrule_enabled);
    let router = route::<get_pushrule_actions::v3::Request, _, _>(router, get_pushrule_actions);
    let router = route::<set_pushrule_actions::v3::Request, _, _>(router, set_pushrule_actions);
    let router = route::<get_pushers::v3::Request, _, _>(router, get_pushers);
    let router = route::<set_pusher::v3::Request, _, _>(router, set_pusher);
    let router = route::<get_notifications::v3::Request, _, _>(router, get_notifications);
    route::<get_protocols::v3::Request, _, _>(router, get_protocols)
}
