"""HTML of the ``/docs`` page (a Jinja template filled from the OpenAPI document).

Kept in a module rather than a templates/ folder so it ships with the package
whatever the packaging rules; no script, stylesheet or font comes from elsewhere.
"""

DOCS_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ info.title }} {{ info.version }}</title>
<style>
  body { font: 15px/1.5 system-ui, sans-serif; margin: 0; color: #1d232a; }
  header { background: #1d3557; color: #fff; padding: 1.2rem 2rem; }
  header h1 { margin: 0; font-size: 1.5rem; }
  header p { margin: .3rem 0 0; opacity: .9; max-width: 60rem; }
  header a { color: #fff; }
  main { display: grid; grid-template-columns: 17rem 1fr; gap: 2rem; padding: 1.5rem 2rem; }
  nav { position: sticky; top: 1rem; align-self: start; font-size: .9rem; }
  nav a { display: block; color: #1d3557; text-decoration: none; padding: .15rem 0; }
  nav a:hover { text-decoration: underline; }
  nav h2 { font-size: .8rem; text-transform: uppercase; letter-spacing: .05em;
           color: #667; margin: 1rem 0 .3rem; }
  section.op { border: 1px solid #d8dee4; border-radius: 6px; margin-bottom: 1.2rem; }
  section.op > h3 { margin: 0; padding: .6rem .9rem; background: #f6f8fa;
                    border-bottom: 1px solid #d8dee4; font: 600 1rem ui-monospace, monospace; }
  section.op > div { padding: .3rem .9rem .8rem; }
  .method { display: inline-block; min-width: 3.6rem; text-align: center; color: #fff;
            border-radius: 4px; padding: 0 .4rem; margin-right: .5rem; font-size: .85rem; }
  .GET { background: #2a7ab0; }
  .POST { background: #2f9e44; }
  .summary { font-weight: 600; margin: .5rem 0 .2rem; }
  table { border-collapse: collapse; width: 100%; margin: .4rem 0; font-size: .9rem; }
  th, td { text-align: left; border-bottom: 1px solid #eaeef2; padding: .25rem .5rem;
           vertical-align: top; }
  th { color: #555; font-weight: 600; }
  code, pre { font-family: ui-monospace, monospace; font-size: .85rem; }
  pre { background: #f6f8fa; border: 1px solid #eaeef2; border-radius: 4px; padding: .6rem;
        overflow-x: auto; }
  h2.part { border-bottom: 2px solid #1d3557; padding-bottom: .2rem; }
  a.schema { color: #1d3557; }
  p.admin { border-left: 3px solid #c92a2a; padding-left: .6rem; }
</style>
</head>
<body>
<header>
  <h1>{{ info.title }} <small>{{ info.version }}</small></h1>
  <p>{{ info.description }}</p>
  <p>Machine-readable: <a href="{{ url_for('openapi.openapi_json') }}">openapi.json</a></p>
</header>
<main>
  <nav>
    <h2>Endpoints</h2>
    {% for op in operations %}
    <a href="#{{ op.anchor }}">
      <span class="method {{ op.method }}">{{ op.method }}</span>{{ op.path }}</a>
    {% endfor %}
    <h2>Schemas</h2>
    {% for name in schemas %}
    <a href="#schema-{{ name }}">{{ name }}</a>
    {% endfor %}
  </nav>
  <div>
    <h2 class="part">Endpoints</h2>
    {% for op in operations %}
    <section class="op" id="{{ op.anchor }}">
      <h3><span class="method {{ op.method }}">{{ op.method }}</span>{{ op.path }}</h3>
      <div>
        <p class="summary">{{ op.summary }}</p>
        <p>{{ op.description }}</p>
        {% if op.admin %}
        <p class="admin">Needs the admin token: <code>Authorization: Bearer &lt;token&gt;</code>
          (401 without it or with a wrong one, 403 when the server has none configured).</p>
        {% endif %}
        {% if op.parameters %}
        <table>
          <tr><th>Parameter</th><th>In</th><th>Required</th><th>Description</th></tr>
          {% for p in op.parameters %}
          <tr>
            <td><code>{{ p.name }}</code></td>
            <td>{{ p["in"] }}</td>
            <td>{{ "yes" if p.required else "no" }}</td>
            <td>{{ p.description or "" }}</td>
          </tr>
          {% endfor %}
        </table>
        {% endif %}
        {% if op.body %}
        <p>Request body (<code>application/json</code>):
          <a class="schema" href="#schema-{{ op.body }}">{{ op.body }}</a></p>
        {% endif %}
        <table>
          <tr><th>Status</th><th>Description</th><th>Body</th></tr>
          {% for r in op.responses %}
          <tr>
            <td><code>{{ r.status }}</code></td>
            <td>{{ r.description }}</td>
            <td>
              {% for c in r.content %}
              <code>{{ c.type }}</code>
              {% if c.schema in schemas %}
              <a class="schema" href="#schema-{{ c.schema }}">{{ c.schema }}</a>
              {% else %}
              <code>{{ c.schema }}</code>
              {% endif %}
              <br>
              {% endfor %}
            </td>
          </tr>
          {% endfor %}
        </table>
      </div>
    </section>
    {% endfor %}
    <h2 class="part">Schemas</h2>
    {% for name, schema in schemas.items() %}
    <section class="op" id="schema-{{ name }}">
      <h3>{{ name }}</h3>
      <div>
        {% if schema.description %}<p>{{ schema.description }}</p>{% endif %}
        <pre>{{ schema.text }}</pre>
      </div>
    </section>
    {% endfor %}
  </div>
</main>
</body>
</html>
"""
